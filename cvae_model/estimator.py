"""``CompressionVAE``: the original's UMAP-like API over the PyTorch model, plus scikit-learn aliases.

The constructor only records its arguments (as scikit-learn and UMAP do). ``train``/``fit``
validate them, restore a model from ``logdir`` or build a new one, prepare the data and run the
shared training loop, in this process (``cvae_model.local``) or on Ray Train workers
(``num_workers > 0``, through ``cvae_model.bridge``). ``embed``/``decode`` restore lazily and go
through ``FittedModel``, the one implementation of inference.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from cvae_model import bridge
from cvae_model.checkpoint import (
    Checkpoint,
    TrainState,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    write_checkpoint_to_logdir,
)
from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.data import ArrayData, TrainingData, split_arrays
from cvae_model.fitted import FittedModel
from cvae_model.local import LocalRun, train_in_process
from cvae_model.normalization import Normalizer
from cvae_model.paths import local_path
from cvae_model.plotting import latent_grid_figure, scatter_figure
from cvae_model.seeds import INIT, derive_seed, resolve_seed
from cvae_model.training import ProgressRecord, setup_training
from cvae_model.vae import VAE
from cvae_model.validation import check_features

__all__ = ["CompressionVAE", "NotFittedError"]

logger = logging.getLogger("cvae")

TEMP_LOGDIR = "temp"
_MODEL_ARGS = ("dim_latent", "iaf_flow_length", "cells_encoder", "initializer",
               "feature_normalization")
_PARAM_NAMES = ("X", "X_valid", "train_valid_split", "dim_latent", "iaf_flow_length",
                "cells_encoder", "initializer", "batch_size", "batch_size_test", "logdir",
                "feature_normalization", "tb_logging", "random_state", "num_workers")


class NotFittedError(ValueError, AttributeError):
    """The estimator has no model yet (no data given and nothing restored from logdir)."""


class CompressionVAE:
    """A VAE with Inverse Autoregressive Flow layers as an embedding function, UMAP-style.

    Parameters are the original CompressionVAE's, with its defaults.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features), or a path, or None
        Training data: an array (a pandas DataFrame works), or a ``.npy`` tree / parquet data
        set, local or on an object store (``s3://...``), streamed through ``pipeline``.
        None: restore the model in ``logdir``, or call ``fit(X)`` later.
    X_valid : array-like or path, optional
        Validation data; when given, ``train_valid_split`` is ignored.
    train_valid_split : float, default 0.9
        Fraction of X used for training; the rest validates (it must not be empty).
    dim_latent : int, default 2
    iaf_flow_length : int, default 5
        Number of IAF steps; 0 is a plain VAE.
    cells_encoder : list of int, optional
        Encoder widths; the decoder mirrors them. None applies the original's rule.
    initializer : {'orthogonal', 'truncated_normal', 'lecun_normal'}, default 'orthogonal'
    batch_size, batch_size_test : int, default 64
    logdir : str or path, default 'temp'
        Where checkpoints live. A model there is restored at the first ``train``/``embed``
        (its stored architecture wins, with a warning naming each ignored argument).
        ``'temp'`` starts afresh, deleting only the checkpoints it wrote itself.
    feature_normalization : bool, default True
    tb_logging : bool, default False
        Write TensorBoard scalars to ``logdir``.
    random_state : int, optional
        Seed of the split, the initial weights, batch order, dropout and noise; None draws one
        (kept as ``seed_`` and in the checkpoint).
    num_workers : int, default 0
        0 trains in this process; N > 0 with N data-parallel Ray Train workers.

    Example
    -------
    >>> X = load_digits().data  # doctest: +SKIP
    >>> CompressionVAE(X, random_state=0).train(num_steps=200).embed(X).shape  # doctest: +SKIP
    (1797, 2)
    """

    def __init__(self, X: Any = None, X_valid: Any = None, train_valid_split: float = 0.9,
                 dim_latent: int = 2, iaf_flow_length: int = 5,
                 cells_encoder: Sequence[int] | None = None, initializer: str = "orthogonal",
                 batch_size: int = 64, batch_size_test: int = 64,
                 logdir: str | os.PathLike[str] = TEMP_LOGDIR, feature_normalization: bool = True,
                 tb_logging: bool = False, random_state: int | None = None,
                 num_workers: int = 0) -> None:
        self.X, self.X_valid, self.train_valid_split = X, X_valid, train_valid_split
        self.dim_latent, self.iaf_flow_length = dim_latent, iaf_flow_length
        self.cells_encoder, self.initializer = cells_encoder, initializer
        self.batch_size, self.batch_size_test = batch_size, batch_size_test
        self.logdir, self.feature_normalization = logdir, feature_normalization
        self.tb_logging, self.random_state, self.num_workers = tb_logging, random_state, num_workers
        self._started = False  # logdir looked at: restored, or 'temp' cleared
        self._data: TrainingData | None = None
        self._data_of: tuple[int, int] | None = None  # ids of the X, X_valid it was built from
        self.restored_ = False
        self.history_: list[dict[str, float]] = []

    # ------------------------------------------------------------------ parameters
    def _requested_config(self, dim_feature: int) -> ModelConfig:
        cells = None if self.cells_encoder is None else tuple(self.cells_encoder)
        return ModelConfig(dim_feature=dim_feature, dim_latent=self.dim_latent,
                           iaf_flow_length=self.iaf_flow_length, cells_encoder=cells,
                           initializer=self.initializer,  # type: ignore[arg-type]
                           feature_normalization=bool(self.feature_normalization))

    def _validate_params(self) -> None:
        """Raise scikit-learn-style errors for invalid parameters (checked before any work)."""
        split = self.train_valid_split
        if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 < split <= 1:
            raise ValueError(f"The 'train_valid_split' parameter of CompressionVAE must be in "
                             f"(0, 1]. Got {split!r} instead.")
        workers = self.num_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"The 'num_workers' parameter of CompressionVAE must be an int in the "
                             f"range [0, inf). Got {workers!r} instead.")
        self._requested_config(dim_feature=1)  # ModelConfig checks the model arguments
        TrainConfig(batch_size=self.batch_size, batch_size_test=self.batch_size_test)
        if self.X is None and self.X_valid is not None:
            raise ValueError("X_valid was given without X; pass the training data as X too.")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _PARAM_NAMES}

    def set_params(self, **params: Any) -> CompressionVAE:
        """Record new parameter values (scikit-learn's contract); a fitted model is kept.

        Architecture arguments that differ from a fitted model's are ignored at the next
        ``train``, with a warning naming each (as for a model restored from ``logdir``).
        """
        unknown = set(params) - set(_PARAM_NAMES)
        if unknown:
            raise ValueError(f"Invalid parameter(s) {sorted(unknown)} for CompressionVAE; valid "
                             f"parameters are {list(_PARAM_NAMES)}")
        for name, value in params.items():
            setattr(self, name, value)
        if params.get("random_state") is not None:
            self.seed_ = int(params["random_state"])
        if "logdir" in params:
            self._started = hasattr(self, "model_")  # a new logdir is looked at by train()
        return self

    # ------------------------------------------------------------------ model state
    @property
    def logdir_(self) -> Path:
        return local_path(self.logdir)

    @property
    def n_features_in_(self) -> int:
        return self._model().config.dim_feature

    def _start(self) -> None:
        """Look at ``logdir`` once: restore its latest checkpoint, or clear 'temp'."""
        if self._started:
            return
        self._started = True
        if os.fspath(self.logdir) == TEMP_LOGDIR:
            for _, path in list_checkpoints(self.logdir_):  # our own files only
                shutil.rmtree(path, ignore_errors=True)
        elif not hasattr(self, "model_") and (found := latest_checkpoint(self.logdir_)):
            self._adopt(load_checkpoint(found), warn_against=True)
            self.restored_ = True
            logger.info("Restored model at step %d from %s", self.state_.step, found)

    def _adopt(self, checkpoint: Checkpoint, warn_against: bool = False) -> None:
        if warn_against:
            self._warn_ignored(checkpoint.model_config)
        self.model_config_ = checkpoint.model_config
        self.model_ = checkpoint.build_model().eval()
        self.normalizer_ = checkpoint.normalizer
        self.state_ = checkpoint.train_state
        self.train_config_ = checkpoint.train_config
        if self.random_state is None and checkpoint.train_config and checkpoint.train_config.seed is not None:
            self.seed_ = checkpoint.train_config.seed
        self._fitted_cache: FittedModel | None = None

    def _warn_ignored(self, stored: ModelConfig) -> None:
        requested = self._requested_config(stored.dim_feature)
        for name in _MODEL_ARGS:
            if name == "cells_encoder" and self.cells_encoder is None:
                continue  # not given: nothing is ignored
            given, kept = getattr(requested, name), getattr(stored, name)
            if given != kept:
                logger.warning("Restoring %s: ignoring %s=%r, the stored model has %s=%r",
                               self.logdir_, name, given, name, kept)

    def _model(self) -> FittedModel:
        self._start()
        if not hasattr(self, "model_"):
            raise NotFittedError("This CompressionVAE has no model yet: pass X and call train(), "
                                 "call fit(X), or point logdir at a trained model.")
        if self._fitted_cache is None:
            self._fitted_cache = FittedModel(self.model_, self.normalizer_)
        return self._fitted_cache

    @property
    def model_config(self) -> ModelConfig:
        return self._model().config

    def _checkpoint(self) -> Checkpoint:
        fitted = self._model()
        return Checkpoint(fitted.config, fitted.model.state_dict(), fitted.normalizer,
                          self.state_, self.train_config_)

    # ------------------------------------------------------------------ data
    def _prepare(self) -> TrainingData:
        if self.X is None:
            raise ValueError("No training data: pass X to CompressionVAE(...) or call fit(X).")
        key = (id(self.X), id(self.X_valid))
        if self._data is not None and self._data_of == key:
            return self._data
        expected = self.model_config_.dim_feature if hasattr(self, "model_") else None
        if isinstance(self.X, (str, os.PathLike)):
            data: TrainingData = bridge.open_path_data(
                self.X, self.X_valid, float(self.train_valid_split), self.seed_, expected)
        else:
            rows = check_features(self.X, "X", expected)
            if self.X_valid is not None:
                data = ArrayData(rows, check_features(self.X_valid, "X_valid", rows.shape[1]))
            else:
                data = ArrayData(*split_arrays(rows, float(self.train_valid_split), self.seed_))
        self._data, self._data_of = data, key
        return data

    def _build(self, data: TrainingData) -> None:
        config = self._requested_config(data.dim_feature)
        normalizer = (Normalizer.from_stats(data.train_stats()) if config.feature_normalization
                      else Normalizer.identity(data.dim_feature))
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.seed_, INIT))
            model = VAE(config)
        self._adopt(Checkpoint(config, model.state_dict(), normalizer, TrainState()))

    # ------------------------------------------------------------------ training
    def train(self, learning_rate: float = TrainConfig.learning_rate,
              num_steps: int = TrainConfig.num_steps,
              dropout_keep_prob: float = TrainConfig.dropout_keep_prob, overwrite: bool = False,
              test_every: int = TrainConfig.test_every,
              lr_scheduling: bool = TrainConfig.lr_scheduling,
              lr_scheduling_steps: int = TrainConfig.lr_scheduling_steps,
              lr_scheduling_factor: float = TrainConfig.lr_scheduling_factor,
              lr_scheduling_min: float = TrainConfig.lr_scheduling_min,
              checkpoint_every: int = TrainConfig.checkpoint_every,
              verbose: bool = True,
              neighbour_weight: float = TrainConfig.neighbour_weight,
              neighbour_perplexity: float = TrainConfig.neighbour_perplexity,
              neighbour_batch_size: int = TrainConfig.neighbour_batch_size,
              neighbour_dof: float | None = TrainConfig.neighbour_dof,
              neighbour_scale: float = TrainConfig.neighbour_scale) -> CompressionVAE:
        """Train for up to ``num_steps`` more optimizer steps; returns self.

        ``num_steps`` counts steps taken by this call (the original's was an absolute cap, so a
        second call did nothing or crashed). Training stops earlier once the plateau rule has
        divided the learning rate down to ``lr_scheduling_min``. The validation loss is computed
        on the whole validation split every ``test_every`` steps. Ctrl-C saves a checkpoint and
        returns the usable estimator.

        ``neighbour_*`` set the neighbour-preserving term added to the objective (``TrainConfig``
        documents each); ``neighbour_weight=0`` trains the original objective.

        A model restored from ``logdir`` continues only with ``overwrite=True`` (as the
        original). Optimizer moments continue from the checkpoint; so does the LR schedule,
        unless ``learning_rate`` differs from the stored one or the previous run converged.
        """
        self._validate_params()
        self.seed_ = resolve_seed(self.random_state) if not hasattr(self, "seed_") else self.seed_
        self._start()
        if self.restored_ and not overwrite and self.state_.step > 0:
            logger.warning("The model in %s is already trained (step %d); pass overwrite=True to "
                           "continue training it. Nothing was trained.", self.logdir_,
                           self.state_.step)
            return self
        data = self._prepare()
        if not hasattr(self, "model_"):
            self._build(data)
        elif not self.restored_:  # set_params may have changed the architecture arguments
            self._warn_ignored(self.model_config_)
        config = TrainConfig(
            learning_rate=learning_rate, num_steps=num_steps, dropout_keep_prob=dropout_keep_prob,
            test_every=test_every, lr_scheduling=lr_scheduling,
            lr_scheduling_steps=lr_scheduling_steps, lr_scheduling_factor=lr_scheduling_factor,
            lr_scheduling_min=lr_scheduling_min, checkpoint_every=checkpoint_every,
            batch_size=self.batch_size, batch_size_test=self.batch_size_test, seed=self.seed_,
            neighbour_weight=neighbour_weight, neighbour_perplexity=neighbour_perplexity,
            neighbour_batch_size=neighbour_batch_size, neighbour_dof=neighbour_dof,
            neighbour_scale=neighbour_scale)
        if self.num_workers > 0:
            checkpoint, history = bridge.train_on_ray(self._checkpoint(), data, config,
                                                      self.num_workers)
            write_checkpoint_to_logdir(checkpoint, self.logdir_, config.keep_checkpoints)
            self._adopt(checkpoint)
            self.history_.extend(history)
        else:
            mode = "continue" if self.state_.step > 0 else "new"
            setup = setup_training(self.model_, config, self.state_, self.train_config_, mode)
            run = LocalRun(self.logdir_, bool(self.tb_logging), verbose, self._record)
            self.state_ = train_in_process(self.model_, self.model_config_, self.normalizer_,
                                           data, config, setup, run)
            self.train_config_ = config
        self.restored_ = False
        self._fitted_cache = None
        return self

    def _record(self, record: ProgressRecord) -> None:
        self.history_.append({"step": float(record.step), **record.as_metrics()})

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the current model as one checkpoint directory at ``path`` (``~`` expanded).

        An existing checkpoint there is replaced only with ``overwrite=True``; anything else
        (another folder, the working or home directory) is never replaced.
        """
        return save_checkpoint(self._checkpoint(), path, overwrite=overwrite)

    # ------------------------------------------------------------------ use
    def embed(self, X: Any, batch_size: int = 64) -> np.ndarray:
        """Embed rows of X: float32 array of shape (n_samples, dim_latent).

        Deterministic (z_0 = mu through the flows, no dropout) and independent of batch size.
        """
        return self._model().embed(X, int(batch_size))

    def decode(self, z: Any, batch_size: int = 64) -> np.ndarray:
        """Decode latent vectors to feature space (un-normalized): shape (n, n_features)."""
        return self._model().decode(z, int(batch_size))

    def visualize(self, z: Any, labels: Any = None, categories: Sequence[str] | None = None,
                  filename: str | os.PathLike[str] | None = None) -> Figure:
        """Scatter plot of 2-D embeddings coloured by ``labels`` (ints or strings, list or
        array). Returns the Figure; writes ``filename`` when given."""
        return scatter_figure(np.asarray(z), labels, categories, filename)

    def visualize_latent_grid(self, xy_range: tuple[float, float] = (-4.0, 4.0),
                              grid_size: int = 10, shape: tuple[int, int] = (28, 28),
                              clip: tuple[float, float] = (0, 255),
                              figsize: tuple[float, float] = (12, 12),
                              filename: str | os.PathLike[str] | None = None) -> Figure:
        """Tile the decodings of a grid over the 2-D latent space; returns the Figure."""
        fitted = self._model()
        if fitted.dim_latent != 2:
            raise ValueError(f"visualize_latent_grid needs dim_latent=2; this model has "
                             f"{fitted.dim_latent}")
        return latent_grid_figure(fitted.decode, xy_range, grid_size, shape, clip, figsize, filename)

    # ------------------------------------------------------------------ scikit-learn
    def fit(self, X: Any = None, y: Any = None, **train_params: Any) -> CompressionVAE:
        """Train on X (if given, it replaces the recorded X); returns self. ``y`` is ignored."""
        if X is not None:
            self.X = X
        return self.train(overwrite=True, **train_params)

    def transform(self, X: Any) -> np.ndarray:
        return self.embed(X, batch_size=max(self.batch_size_test, 256))

    def fit_transform(self, X: Any, y: Any = None, **train_params: Any) -> np.ndarray:
        return self.fit(X, y, **train_params).transform(X)

    def inverse_transform(self, z: Any) -> np.ndarray:
        return self.decode(z, batch_size=max(self.batch_size_test, 256))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, uri: str | os.PathLike[str]) -> CompressionVAE:
        """Load a trained model: a logdir or checkpoint directory (local or ``s3://...``), or an
        MLflow reference such as ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
        ``runs:/RUN_ID/model``. Always the latest complete checkpoint of a logdir."""
        logdir: str | Path = TEMP_LOGDIR
        if bridge.is_remote_reference(uri):
            checkpoint = bridge.load_reference(os.fspath(uri))
        else:
            found = find_checkpoint(uri)
            checkpoint = load_checkpoint(found)
            # A checkpoint directory's logdir is its parent; a logdir is itself.
            logdir = found.parent if found == local_path(uri) else local_path(uri)
        cfg = checkpoint.model_config
        estimator = cls(dim_latent=cfg.dim_latent, iaf_flow_length=cfg.iaf_flow_length,
                        cells_encoder=list(cfg.cells_encoder or ()), initializer=cfg.initializer,
                        feature_normalization=cfg.feature_normalization, logdir=logdir)
        estimator._started = True  # adopted here: nothing in logdir is cleared or re-read
        estimator._adopt(checkpoint)
        estimator.restored_ = True
        return estimator
