"""The stop request of a training process: SIGTERM / SIGUSR1 (SLURM preemption, time limit).

A handler only sets a flag; the trainer finishes the step in flight, saves and exits with
REQUEUE_EXIT_CODE (pretrain/trainer.py). `python -m pretrain` installs the handlers first thing,
before torch and DeepSpeed are imported, so a signal during start-up (imports, process groups,
model build, checkpoint load: minutes on a big job) does not kill the process with a code the
SLURM script would not requeue: such a run takes one step, saves it and exits for a requeue.
No heavy imports here on purpose.
"""

from __future__ import annotations

import signal

_STOP = {"requested": False}


def install_stop_handlers() -> None:
    def handler(signum, _frame):
        _STOP["requested"] = True

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def stop_requested() -> bool:
    return _STOP["requested"]
