"""Stage 2, trial: run real training steps of one candidate in a fresh process.

``run_trial`` (``runner``) forks the trial from a server that imported torch once
(``forkserver``); the trial itself (``child``) builds the job, runs warm-up and timed steps
under the memory limit and reports one ``TrialResult`` (``result``); ``oom`` says whether an
exception is an out-of-memory and which limit produced it.
"""

from autofit.trials.oom import is_oom_error
from autofit.trials.result import TrialResult, TrialStatus
from autofit.trials.runner import kill_active_trials, prestart, run_trial, shutdown

__all__ = ["TrialResult", "TrialStatus", "is_oom_error", "kill_active_trials", "prestart",
           "run_trial", "shutdown"]
