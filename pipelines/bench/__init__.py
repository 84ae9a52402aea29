"""Every benchmark behind ``lsnet bench NAME``: :mod:`~pipelines.bench.runner` runs the spec
``jobs/bench/NAME.yaml`` (``runner: pipelines.bench.MODULE:FUNCTION``) and writes ``results/bench/NAME.json``;
one module per benchmark (losses, model, mask_study, data + reader, train, tune, gpu + gpu_models)."""
