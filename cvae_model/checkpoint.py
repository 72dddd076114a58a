"""The one checkpoint format, used by a logdir, by Ray Train checkpoints and by MLflow artifacts.

A checkpoint is a directory of four files::

    config.json          {"format_version", "model": ModelConfig, "train": TrainConfig | null}
    model.pt             the VAE's state_dict (loaded with weights_only=True)
    normalization.npz    mean and scale per feature (numbers, never a pickle)
    train_state.pt       step, target step, optimizer / LR-schedule / RNG state, best and last
                         validation loss (tensors and plain Python values only)

This module is the only place in ``cvae_model`` that touches files. Writes go to a temporary
sibling directory that is renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.normalization import Normalizer
from cvae_model.vae import VAE

__all__ = [
    "CHECKPOINT_FILES",
    "Checkpoint",
    "TrainState",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "replace_directory",
    "save_checkpoint",
    "write_checkpoint_to_logdir",
]

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
NORMALIZATION_FILE = "normalization.npz"
STATE_FILE = "train_state.pt"
CHECKPOINT_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, NORMALIZATION_FILE, STATE_FILE})
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d{9})$")


@dataclass
class TrainState:
    """Everything beyond the weights that training needs to continue exactly where it stopped."""

    step: int = 0
    """Optimizer steps taken so far (global, across train() calls and restarts)."""
    target_step: int = 0
    """The step this run trains to; a resumed run continues to the same target."""
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    best_val_loss: float = float("inf")
    last_val_loss: float = float("nan")
    converged: bool = False
    """True once the LR schedule hit its minimum and stopped training."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "target_step": self.target_step,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "rng": self.rng,
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
            "converged": self.converged,
        }


@dataclass
class Checkpoint:
    """A checkpoint in memory."""

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    normalizer: Normalizer
    train_state: TrainState
    train_config: TrainConfig | None = None

    def build_model(self) -> VAE:
        model = VAE(self.model_config)
        model.load_state_dict(self.state_dict)
        return model


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` as the directory ``path``, atomically (temp dir, then rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        config = {
            "format_version": FORMAT_VERSION,
            "model": checkpoint.model_config.to_dict(),
            "train": checkpoint.train_config.to_dict() if checkpoint.train_config else None,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        torch.save({k: v.detach().cpu() for k, v in checkpoint.state_dict.items()}, tmp / WEIGHTS_FILE)
        with open(tmp / NORMALIZATION_FILE, "wb") as f:
            np.savez(f, **checkpoint.normalizer.to_arrays())
        torch.save(checkpoint.train_state.to_dict(), tmp / STATE_FILE)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def replace_directory(source: Path, target: Path) -> None:
    """Move the complete directory ``source`` to ``target``, replacing any older ``target``.

    The old one is renamed aside first and deleted last, so at every moment a complete copy
    exists at one of the two names (a rename within a filesystem is atomic).
    """
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory; raises FileNotFoundError naming any missing file."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"No checkpoint directory at {root.resolve()}")
    missing = sorted(name for name in CHECKPOINT_FILES if not (root / name).is_file())
    if missing:
        raise FileNotFoundError(
            f"Checkpoint {root.resolve()} is incomplete: missing {', '.join(missing)} "
            f"(a checkpoint holds {', '.join(sorted(CHECKPOINT_FILES))})"
        )
    config = json.loads((root / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"Checkpoint {root} has format_version {config.get('format_version')!r}; "
            f"this cvae reads version {FORMAT_VERSION}"
        )
    model_dict = dict(config["model"])
    model_dict["cells_encoder"] = tuple(model_dict["cells_encoder"])
    model_config = ModelConfig.from_dict(model_dict)
    train_config = TrainConfig.from_dict(config["train"]) if config.get("train") else None
    state_dict = torch.load(root / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    with np.load(root / NORMALIZATION_FILE, allow_pickle=False) as arrays:
        normalizer = Normalizer.from_arrays(dict(arrays))
    raw_state = torch.load(root / STATE_FILE, map_location="cpu", weights_only=True)
    return Checkpoint(model_config, state_dict, normalizer, TrainState(**raw_state), train_config)


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step:09d}"


def list_checkpoints(logdir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints directly under ``logdir`` as (step, path), oldest first."""
    root = Path(logdir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(logdir: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(logdir)
    return found[-1][1] if found else None


def write_checkpoint_to_logdir(checkpoint: Checkpoint, logdir: str | os.PathLike[str],
                               keep: int) -> Path:
    """Save as ``logdir/checkpoint-<step>`` and delete all but the newest ``keep`` checkpoints."""
    path = save_checkpoint(checkpoint, Path(logdir) / checkpoint_dir_name(checkpoint.train_state.step))
    for _, old in list_checkpoints(logdir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path
