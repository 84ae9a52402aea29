"""MLflow tracking that survives a tracking-server outage.

- :mod:`~pipelines.tracking.store` — which store (the tracking URI, resolved once) and its preparation;
- :mod:`~pipelines.tracking.journal` — the write-ahead journal of a run and the uploader replaying it;
- :mod:`~pipelines.tracking.tracker` — :class:`~pipelines.tracking.tracker.RunTracker`, what runs log through.
"""
