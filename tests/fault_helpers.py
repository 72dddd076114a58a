"""Fault injection for Ray Train runs: a training callback that kills a worker process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


class KillRankOneAt:
    """A training callback that kills rank 1's process once, at ``step`` (a lost worker);
    ``marker`` is the file that records that it happened (and keeps a restart from repeating it)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_step(self, step: int, loss: float) -> None:
        import ray.train

        if (step == self.step and ray.train.get_context().get_world_rank() == 1
                and not os.path.exists(self.marker)):
            Path(self.marker).write_text(str(step))
            time.sleep(3)  # let the controller register the last checkpoint, as real failures do
            os.kill(os.getpid(), signal.SIGKILL)
