"""The one checkpoint format: a logdir, a Ray Train checkpoint, an MLflow artifact, a model in transit.

A checkpoint is four files::

    config.json          {"format_version", "model": ModelConfig, "train": TrainConfig | null}
    model.pt             the VAE's state_dict (loaded with weights_only=True)
    normalization.npz    mean and scale per feature (numbers, never a pickle)
    train_state.pt       step, target step, optimizer / LR-schedule state, best and last
                         validation loss (tensors and plain Python values only)

Between processes and nodes a checkpoint travels as those files' bytes (``Checkpoint.to_files``,
``Checkpoint.from_files``), never as a local path. This module is the only place in
``cvae_model`` that touches files: directories are written to a temporary sibling and renamed
into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.normalization import Normalizer
from cvae_model.paths import local_path, replace_refusal
from cvae_model.vae import VAE, upgrade_optimizer_state_dict, upgrade_state_dict

__all__ = [
    "CHECKPOINT_FILES",
    "Checkpoint",
    "TrainState",
    "checkpoint_dir_name",
    "checkpoint_step",
    "find_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "replace_directory",
    "save_checkpoint",
    "write_checkpoint_to_logdir",
]

FORMAT_VERSION = 2
"""2: the IAF output layer is block-diagonal ``(2, k, h)``; 1 stored it as a masked dense matrix."""
READABLE_VERSIONS = (1, 2)
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
    best_val_loss: float = float("inf")
    last_val_loss: float = float("nan")
    converged: bool = False
    """True once the LR schedule hit its minimum and stopped training."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})  # v1 also held "rng"


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

    def to_files(self) -> dict[str, bytes]:
        """The checkpoint's four files as bytes (what a directory would hold)."""
        config = {
            "format_version": FORMAT_VERSION,
            "model": self.model_config.to_dict(),
            "train": self.train_config.to_dict() if self.train_config else None,
        }
        weights, state, norm = io.BytesIO(), io.BytesIO(), io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.state_dict.items()}, weights)
        torch.save(self.train_state.to_dict(), state)
        np.savez(norm, **self.normalizer.to_arrays())
        return {CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
                WEIGHTS_FILE: weights.getvalue(), NORMALIZATION_FILE: norm.getvalue(),
                STATE_FILE: state.getvalue()}

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], where: str = "the checkpoint",
                   map_location: str | torch.device = "cpu") -> Checkpoint:
        """Rebuild from the four files' bytes; ``where`` names the source in errors."""
        missing = sorted(CHECKPOINT_FILES - set(files))
        if missing:
            raise FileNotFoundError(
                f"Checkpoint {where} is incomplete: missing {', '.join(missing)} "
                f"(a checkpoint holds {', '.join(sorted(CHECKPOINT_FILES))})")
        config = json.loads(files[CONFIG_FILE])
        version = config.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"Checkpoint {where} has format_version {version!r}; this cvae "
                             f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        model_config = ModelConfig.from_dict(config["model"])
        train_config = TrainConfig.from_dict(config["train"]) if config.get("train") else None
        state_dict = torch.load(io.BytesIO(files[WEIGHTS_FILE]), map_location=map_location,
                                weights_only=True)
        with np.load(io.BytesIO(files[NORMALIZATION_FILE]), allow_pickle=False) as arrays:
            normalizer = Normalizer.from_arrays(dict(arrays))
        raw_state = torch.load(io.BytesIO(files[STATE_FILE]), map_location="cpu",
                               weights_only=True)
        train_state = TrainState.from_dict(raw_state)
        if version == 1:  # same function, older parameter layout: convert exactly
            state_dict = upgrade_state_dict(state_dict, model_config)
            if train_state.optimizer:
                train_state.optimizer = upgrade_optimizer_state_dict(train_state.optimizer,
                                                                     model_config)
        return cls(model_config, state_dict, normalizer, train_state, train_config)


# ---------------------------------------------------------------------------- directories
def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step:09d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a ``checkpoint-<step>`` directory name, else None."""
    match = _CHECKPOINT_DIR.match(name)
    return int(match.group(1)) if match else None


def _is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in CHECKPOINT_FILES)


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


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike[str], *,
                    overwrite: bool = True) -> Path:
    """Write ``checkpoint`` as the directory ``path`` (``~`` expanded), atomically.

    An existing directory is replaced only when it is a checkpoint (it holds nothing but
    checkpoint files) and ``overwrite`` is true; never the working or home directory.
    """
    target = local_path(path)
    if target.exists():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in CHECKPOINT_FILES) \
            if target.is_dir() else [target.name]
        reason = replace_refusal(target)
        if reason or foreign:
            why = reason or f"it is not a cvae checkpoint (it holds {', '.join(foreign[:5])})"
            raise FileExistsError(f"Not replacing {target}: {why}")
        if not overwrite:
            raise FileExistsError(f"{target} already holds a checkpoint; pass overwrite=True to "
                                  "replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name, data in checkpoint.to_files().items():
            (tmp / name).write_bytes(data)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_checkpoint_files(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """The four files of the checkpoint directory ``path`` (those present)."""
    root = local_path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"No checkpoint directory at {root}")
    return {name: (root / name).read_bytes() for name in CHECKPOINT_FILES
            if (root / name).is_file()}


def load_checkpoint(path: str | os.PathLike[str],
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory; raises FileNotFoundError naming any missing file."""
    return Checkpoint.from_files(read_checkpoint_files(path), str(local_path(path)), map_location)


def list_checkpoints(logdir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints directly under ``logdir`` as (step, path), oldest first."""
    root = local_path(logdir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(child.name), child) for child in root.iterdir()]
    return sorted((step, path) for step, path in found if step is not None and _is_complete(path))


def latest_checkpoint(logdir: str | os.PathLike[str]) -> Path | None:
    """The latest complete checkpoint of a logdir: the one checkpoint choice everywhere."""
    found = list_checkpoints(logdir)
    return found[-1][1] if found else None


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint a path names: itself, or the latest complete ``checkpoint-*`` under it.

    ``path`` may be a checkpoint directory, a logdir, or a folder holding one checkpoint
    somewhere below (an MLflow model's artifacts). Raises FileNotFoundError naming what is
    there when there is no complete checkpoint, or several unnumbered ones.
    """
    root = local_path(path)
    if _is_complete(root):
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"No cvae model at {root}: expected a checkpoint directory or a "
                                "logdir containing checkpoint-* directories")
    latest = latest_checkpoint(root)
    if latest is not None:
        return latest
    configs = sorted(root.rglob(CONFIG_FILE))
    complete = [p.parent for p in configs if _is_complete(p.parent)]
    steps = [(checkpoint_step(p.name), p) for p in complete]
    if len(complete) == 1 or (complete and all(step is not None for step, _ in steps)):
        return max(steps, key=lambda item: item[0] or 0)[1]
    if complete:
        raise FileNotFoundError(f"{root} holds several checkpoints "
                                f"({', '.join(map(str, complete[:4]))}); name one of them")
    partial = configs[0].parent if configs else (
        root if any((root / name).exists() for name in CHECKPOINT_FILES) else None)
    if partial is not None:
        missing = sorted(n for n in CHECKPOINT_FILES if not (partial / n).is_file())
        raise FileNotFoundError(f"The checkpoint in {partial} is incomplete: missing "
                                f"{', '.join(missing)} (a checkpoint holds "
                                f"{', '.join(sorted(CHECKPOINT_FILES))})")
    raise FileNotFoundError(f"No cvae model at {root}: expected a checkpoint directory or a "
                            "logdir containing checkpoint-* directories")


def write_checkpoint_to_logdir(checkpoint: Checkpoint, logdir: str | os.PathLike[str],
                               keep: int) -> Path:
    """Save as ``logdir/checkpoint-<step>`` and delete all but the newest ``keep`` checkpoints."""
    name = checkpoint_dir_name(checkpoint.train_state.step)
    path = save_checkpoint(checkpoint, local_path(logdir) / name, overwrite=True)
    for _, old in list_checkpoints(logdir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path
