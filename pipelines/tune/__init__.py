"""Stage 3 of the pipeline: hyper-parameter search with Ray Tune (``lsnet tune``).

- :mod:`pipelines.tune.space` — search-space files (configs/spaces/), validated like configs;
- :mod:`pipelines.tune.trials` — :func:`run_trials`: config variants as Tune trials, each one Ray Train
  run (pipelines.train.driver.run_training), MLflow parent + child runs; reusable for ablations;
- :mod:`pipelines.tune.report` — trial records, results table, best config, plots;
- :mod:`pipelines.tune.cli` — the ``lsnet tune`` command.
"""
