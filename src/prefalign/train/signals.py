"""SIGTERM (preemption) and SIGINT (Ctrl-C) during `prefalign train`: stop cleanly, lose nothing.

  - before training starts (data, models): the run stops at once, there is nothing to save;
  - while training: the current optimizer step finishes, a checkpoint is saved (whatever
    `save_strategy` says), and the run exits with `Interrupted` (exit status 128 + the signal
    number: 130 for SIGINT, 143 for SIGTERM) after printing the command that resumes it;
  - while the final model is saved: the save finishes (it is short), then the run ends normally;
  - a second signal, at any time: exit at once with the same status, saving nothing more.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from prefalign.errors import PrefalignError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(PrefalignError):
    """A run stopped by a signal. `checkpoint`: where its work is saved (None: stopped before training).

    `signum` None: this process was stopped because another process of the run received the signal.
    """

    def __init__(self, signum: int | None, step: int | None = None, checkpoint: str | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + (signum or signal.SIGTERM)
        name = signal.Signals(signum).name if signum else "a signal to another process of this run"
        if checkpoint is None:
            message = f"interrupted by {name} before training started; nothing was saved"
        else:
            message = f"interrupted by {name} after step {step}; its checkpoint is {checkpoint}"
        super().__init__(message)


class StopSignals:
    """Context manager installing the handlers; `phase` ("setup", "training", "saving") says what a signal does."""

    def __init__(self):
        self.phase = "setup"
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"prefalign: second signal ({name}): stopping now, without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        if self.phase == "setup":
            raise Interrupted(signum)
        then = ("finishing the current step, then saving a checkpoint" if self.phase == "training"
                else "finishing the final save")
        print(f"prefalign: {name} received: {then} (send it again to stop at once)", file=sys.stderr, flush=True)
