"""The ASHA scheduler of ``lsnet tune`` (imported only when a search runs: it imports Ray Tune)."""
from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler


class LastEpochASHA(ASHAScheduler):
    """ASHA that never stops a trial at its last epoch.

    Ray's ASHA has a rung at ``max_t`` itself (with ``max_t = grace_period = epochs`` it is the only one),
    and ``stop_last_trials=False`` does not exempt it: a trial below that rung's cutoff was stopped right
    after reporting its last epoch -- while its rank 0 was still writing the final weights, the curves
    and the MLflow model, before it ended its MLflow run (left RUNNING, or FAILED by the trial's driver
    seeing its workers killed) -- though the search report called it FINISHED. A stop there saves no
    training, so the trial finishes; its result still counts in the rung's statistics.
    """

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) >= self._max_t:
            self._num_stopped -= 1  # ASHA counted it as stopped
            return TrialScheduler.CONTINUE
        return action
