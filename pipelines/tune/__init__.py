"""Stage 3 of the pipeline: hyper-parameter search with Ray Tune (``lsnet tune``).

- :mod:`pipelines.tune.space` — search-space files (configs/spaces/), validated like configs;
- :mod:`pipelines.tune.trials` — :func:`run_trials`: config variants as Tune trials, each one Ray Train
  run (pipelines.train.driver.run_training), MLflow parent + child runs; reusable for ablations;
- :mod:`pipelines.tune.records` — the search directory's names, settings, trial records, outcome;
- :mod:`pipelines.tune.report` — results table, best config, plots, the end of the parent run.
The ``lsnet tune`` command: :mod:`pipelines.cli.tune`.
"""
