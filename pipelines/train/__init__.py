"""Distributed training on Ray Train (``lsnet train``).

- :mod:`~pipelines.train.driver` — what runs on the driver: :func:`~pipelines.train.driver.run_training`;
- :mod:`~pipelines.train.worker` — what runs on each worker: the loop (``train_loop_per_worker``);
- :mod:`~pipelines.train.parts` — what a worker trains with (model, optimiser, loaders, resume, DDP);
- :mod:`~pipelines.train.progress` — what a run prints and logs to MLflow;
- :mod:`~pipelines.train.rundir` — the run directory's names.
"""
