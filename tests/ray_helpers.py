"""Ray Train helpers for tests: a two-worker run of a loop, and a callback that kills a worker."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.cloudpickle as cloudpickle

# Ray workers cannot import this file (tests/ is on the driver's path only): the callbacks and
# loops defined here travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


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


def run_on_two_workers(loop: Callable[[dict[str, Any]], None], config: dict[str, Any], name: str,
                       storage: Path) -> None:
    """``loop(config)`` on 2 Ray Train workers (half a CPU each, so the 2-CPU test runtime has
    room for the controller) with its run stored under ``storage``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    TorchTrainer(loop, train_loop_config=config,
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=ray.train.RunConfig(name=name, storage_path=str(storage))).fit()
