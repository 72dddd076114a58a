"""Ray Train helpers for tests: a two-worker run of a loop and the check of its one DDP step, and
a callback that kills a worker."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray.cloudpickle as cloudpickle
import torch

from cvae_model.config import ModelConfig
from cvae_model.vae import VAE

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


def run_on_two_workers(loop: Callable[[dict[str, Any]], None], x: np.ndarray, eps: np.ndarray,
                       name: str, folder: Path) -> Path:
    """``loop({"x", "eps", "out"})`` on 2 Ray Train workers (half a CPU each, so the 2-CPU test
    runtime has room for the controller), its run stored under ``folder``; the path the loop's
    rank 0 saves to (``out``: ``folder / "ddp.npz"``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    out = folder / "ddp.npz"
    TorchTrainer(loop, train_loop_config={"x": x.tolist(), "eps": eps.tolist(), "out": str(out)},
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=ray.train.RunConfig(name=name, storage_path=str(folder / "ray"))).fit()
    return out


def small_vae() -> VAE:
    """The 8 -> 2 VAE (cells 16, 8; 2 IAF layers) of the one-step DDP equivalence tests, built
    after ``torch.manual_seed(0)`` so that every worker and the test start from the same weights."""
    torch.manual_seed(0)
    return VAE(ModelConfig(dim_feature=8, dim_latent=2, iaf_flow_length=2, cells_encoder=(16, 8)))


def assert_same_step(saved: Path, model: VAE, initial: dict[str, torch.Tensor]) -> None:
    """The weights rank 0 saved (``np.savez``) after its DDP step equal ``model``'s after the same
    step in process (within 1e-5), and that step changed every weight but the IAF masks."""
    with np.load(saved) as ddp:
        for name, value in model.state_dict().items():
            np.testing.assert_allclose(ddp[name], value.numpy(), atol=1e-5, rtol=0, err_msg=name)
            assert not torch.equal(initial[name], value) or "mask" in name, name
