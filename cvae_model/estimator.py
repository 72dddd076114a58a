"""``CompressionVAE``: the original's UMAP-like API over the PyTorch model, plus scikit-learn aliases.

The estimator is a launcher: it prepares data, builds configs, and runs the shared training loop
(``cvae_model.training.run_training``) in this process, saving checkpoints to ``logdir``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from cvae_model.checkpoint import (
    Checkpoint,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    write_checkpoint_to_logdir,
)
from cvae_model.config import ModelConfig, TrainConfig
from cvae_model.data import ArrayData, TrainingData, derive_seed
from cvae_model.normalization import Normalizer
from cvae_model.plotting import latent_grid_figure, scatter_figure
from cvae_model.training import (
    ProgressRecord,
    ValidationResult,
    evaluate_batches,
    make_optimizer,
    make_scheduler,
    run_training,
)
from cvae_model.validation import check_features, check_latents
from cvae_model.vae import VAE

__all__ = ["CompressionVAE", "NotFittedError"]

logger = logging.getLogger("cvae")

TEMP_LOGDIR = "temp"
_MODEL_ARGS = ("dim_latent", "iaf_flow_length", "cells_encoder", "initializer",
               "feature_normalization")


class NotFittedError(ValueError, AttributeError):
    """The estimator has no model yet (no data given and nothing restored from logdir)."""


def _in_batches(array: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, array.shape[0], batch_size):
        yield array[start:start + batch_size]


class _LocalCallbacks:
    """Progress bar, log lines, TensorBoard scalars and logdir checkpoints for in-process training."""

    def __init__(self, owner: CompressionVAE, config: TrainConfig, total: int, initial: int,
                 verbose: bool) -> None:
        from tqdm.auto import tqdm

        self.owner = owner
        self.config = config
        self.bar = tqdm(total=total, initial=initial, disable=not verbose, unit="step",
                        desc="cvae train", dynamic_ncols=True)
        self.writer = None
        if owner.tb_logging:
            from tensorboardX import SummaryWriter  # installed with ray[train]

            self.writer = SummaryWriter(str(owner.logdir_))

    def on_step(self, step: int, loss: float) -> None:
        self.bar.update(1)

    def on_validation(self, record: ProgressRecord) -> None:
        self.owner.history_.append({"step": record.step, **record.as_metrics()})
        self.bar.set_postfix(train=f"{record.train_loss:.4g}", val=f"{record.val_loss:.4g}",
                             lr=f"{record.learning_rate:.1e}", rows_s=f"{record.samples_per_s:.0f}")
        logger.debug("step %d train %.5g val %.5g lr %.2e %.0f samples/s", record.step,
                     record.train_loss, record.val_loss, record.learning_rate, record.samples_per_s)
        if self.writer is not None:
            for name, value in record.as_metrics().items():
                self.writer.add_scalar(name, value, record.step)

    def save(self, state: TrainState) -> None:
        self.owner._save(state, self.config)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


class CompressionVAE:
    """A VAE with Inverse Autoregressive Flow layers as an embedding function, UMAP-style.

    Parameters are the original CompressionVAE's, with its defaults.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features), or a path, or None
        Training data: an array (a pandas DataFrame works), or the root of a directory tree of
        ``.npy`` files / a parquet dataset (streamed through ``pipeline.sources``). None restores
        the model in ``logdir``, or leaves the estimator unfitted (call ``fit(X)``).
    X_valid : array-like, optional
        Validation data; when given, ``train_valid_split`` is ignored.
    train_valid_split : float, default 0.9
        Fraction of X used for training; the rest validates.
    dim_latent : int, default 2
    iaf_flow_length : int, default 5
        Number of IAF steps; 0 is a plain VAE.
    cells_encoder : list of int, optional
        Encoder widths; the decoder mirrors them. None applies the original's rule.
    initializer : {'orthogonal', 'truncated_normal', 'lecun_normal'}, default 'orthogonal'
    batch_size, batch_size_test : int, default 64
    logdir : str or path, default 'temp'
        Where checkpoints live. An existing model there is restored (its stored architecture
        wins over the arguments, with a warning naming each). ``'temp'`` always starts afresh,
        deleting only the checkpoints it wrote itself.
    feature_normalization : bool, default True
    tb_logging : bool, default False
        Write TensorBoard scalars to ``logdir``.
    random_state : int, optional
        Seed of the split, the initial weights, batch order, dropout and noise.
    num_workers : int, default 0
        0 trains in this process. N > 0 trains with N data-parallel Ray Train workers
        (``pipeline.ray_training``; a local Ray runtime starts on demand, or ``RAY_ADDRESS``
        is joined), tracked in MLflow; the result lands in ``logdir`` as usual.

    Example
    -------
    >>> from sklearn.datasets import load_digits
    >>> X = load_digits().data
    >>> embedder = CompressionVAE(X, logdir="/tmp/cvae_doctest", random_state=0)
    >>> z = embedder.train(num_steps=200, verbose=False).embed(X)
    >>> z.shape
    (1797, 2)
    """

    def __init__(self, X: Any = None, X_valid: Any = None, train_valid_split: float = 0.9,
                 dim_latent: int = 2, iaf_flow_length: int = 5,
                 cells_encoder: Sequence[int] | None = None, initializer: str = "orthogonal",
                 batch_size: int = 64, batch_size_test: int = 64,
                 logdir: str | os.PathLike[str] = TEMP_LOGDIR, feature_normalization: bool = True,
                 tb_logging: bool = False, random_state: int | None = None,
                 num_workers: int = 0) -> None:
        self.X = X
        self.X_valid = X_valid
        self.train_valid_split = train_valid_split
        self.dim_latent = dim_latent
        self.iaf_flow_length = iaf_flow_length
        self.cells_encoder = cells_encoder
        self.initializer = initializer
        self.batch_size = batch_size
        self.batch_size_test = batch_size_test
        self.logdir = logdir
        self.feature_normalization = feature_normalization
        self.tb_logging = tb_logging
        self.random_state = random_state
        self.num_workers = num_workers
        self._setup()

    # ------------------------------------------------------------------ construction
    def _setup(self) -> None:
        if not 0.0 < float(self.train_valid_split) <= 1.0:
            raise ValueError(f"The 'train_valid_split' parameter of CompressionVAE must be in "
                             f"(0, 1]. Got {self.train_valid_split!r} instead.")
        is_temp = os.fspath(self.logdir) == TEMP_LOGDIR
        self.logdir_ = Path(os.path.abspath(os.path.expanduser(os.fspath(self.logdir))))
        self.seed_ = (int(self.random_state) if self.random_state is not None
                      else int(np.random.SeedSequence().generate_state(1)[0]))
        self.model_: VAE | None = None
        self.model_config_: ModelConfig | None = None
        self.normalizer_: Normalizer | None = None
        self.state_ = TrainState()
        self.train_config_: TrainConfig | None = None
        self.history_: list[dict[str, float]] = []
        self.restored_ = False
        self._data: TrainingData | None = None
        # Validate the model arguments before touching anything on disk.
        self._requested_config(dim_feature=1)

        if is_temp:
            for _, path in list_checkpoints(self.logdir_):  # our own files only
                shutil.rmtree(path, ignore_errors=True)
        elif latest_checkpoint(self.logdir_) is not None:
            self._restore(latest_checkpoint(self.logdir_))
        if self.X is not None:
            self._prepare_data(self.X, self.X_valid)
        elif self.X_valid is not None:
            raise ValueError("X_valid was given without X; pass the training data as X too.")

    def _requested_config(self, dim_feature: int) -> ModelConfig:
        cells = None if self.cells_encoder is None else tuple(self.cells_encoder)
        return ModelConfig(dim_feature=dim_feature, dim_latent=self.dim_latent,
                           iaf_flow_length=self.iaf_flow_length, cells_encoder=cells,
                           initializer=self.initializer,  # type: ignore[arg-type]
                           feature_normalization=bool(self.feature_normalization))

    def _restore(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        stored = checkpoint.model_config
        requested = self._requested_config(stored.dim_feature)
        for name in _MODEL_ARGS:
            given, kept = getattr(requested, name), getattr(stored, name)
            if name == "cells_encoder" and self.cells_encoder is None:
                continue  # not given: nothing is ignored
            if given != kept:
                logger.warning("Restoring %s: ignoring %s=%r, the stored model has %s=%r",
                               self.logdir_, name, given, name, kept)
        self._adopt(checkpoint)
        logger.info("Restored model at step %d from %s", self.state_.step, path)

    def _adopt(self, checkpoint: Checkpoint) -> None:
        self.model_config_ = checkpoint.model_config
        self.model_ = checkpoint.build_model()
        self.normalizer_ = checkpoint.normalizer
        self.state_ = checkpoint.train_state
        self.train_config_ = checkpoint.train_config
        self.restored_ = True
        # Attributes mirror the model actually in use, not the ignored arguments.
        self.dim_latent = self.model_config_.dim_latent
        self.iaf_flow_length = self.model_config_.iaf_flow_length
        self.cells_encoder = list(self.model_config_.cells_encoder or ())
        self.initializer = self.model_config_.initializer
        self.feature_normalization = self.model_config_.feature_normalization

    def _prepare_data(self, X: Any, X_valid: Any) -> None:
        if isinstance(X, (str, os.PathLike)):
            # A .npy tree or parquet data set, streamed through the Ray Data readers.
            from pipeline.local_data import StreamingData

            expected = self.model_config_.dim_feature if self.model_config_ else None
            data: TrainingData = StreamingData.open(X, X_valid, self.train_valid_split,
                                                    seed=self.seed_, dim_feature=expected)
        else:
            data = ArrayData(*self._split_arrays(X, X_valid))
        if self.model_ is None:
            dim_feature = data.dim_feature
            self.model_config_ = self._requested_config(dim_feature)
            self.normalizer_ = (Normalizer.from_stats(data.train_stats())
                                if self.model_config_.feature_normalization
                                else Normalizer.identity(dim_feature))
            with torch.random.fork_rng():
                torch.manual_seed(derive_seed(self.seed_, 1))
                self.model_ = VAE(self.model_config_)
        self._data = data

    def _split_arrays(self, X: Any, X_valid: Any) -> tuple[np.ndarray, np.ndarray]:
        expected = self.model_config_.dim_feature if self.model_config_ else None
        data = check_features(X, "X", expected)
        if X_valid is not None:
            return data, check_features(X_valid, "X_valid", data.shape[1])
        n = data.shape[0]
        n_train = int(self.train_valid_split * n)
        if n_train < 1 or (n - n_train < 1 and self.train_valid_split < 1):
            raise ValueError(f"X has {n} sample(s): too few to split with train_valid_split="
                             f"{self.train_valid_split}; pass X_valid or more data.")
        order = np.random.default_rng(derive_seed(self.seed_, 0)).permutation(n)
        train_rows, valid_rows = order[:n_train], order[n_train:]
        if valid_rows.size == 0:  # train_valid_split=1.0: validate on the training data
            valid_rows = train_rows
        return data[train_rows], data[valid_rows]

    # ------------------------------------------------------------------ training
    def train(self, learning_rate: float = 1e-3, num_steps: int = 50_000,
              dropout_keep_prob: float = 1.0, overwrite: bool = False, test_every: int = 50,
              lr_scheduling: bool = True, lr_scheduling_steps: int = 10,
              lr_scheduling_factor: float = 5, lr_scheduling_min: float = 1e-5,
              checkpoint_every: int = 2000, verbose: bool = True) -> CompressionVAE:
        """Train for up to ``num_steps`` more optimizer steps; returns self.

        ``num_steps`` counts steps taken by this call (the original's was an absolute cap, so a
        second call did nothing or crashed). Training stops earlier once the plateau rule has
        divided the learning rate down to ``lr_scheduling_min``. The validation loss is computed
        on the whole validation split every ``test_every`` steps. Ctrl-C saves a checkpoint and
        returns the usable estimator.

        A model restored from ``logdir`` continues only with ``overwrite=True`` (as the
        original): its checkpoints will be overwritten. Optimizer moments and the learning-rate
        schedule continue from the checkpoint unless ``learning_rate`` differs from the stored
        one or the previous run had converged; then the schedule restarts at ``learning_rate``.
        """
        if self.restored_ and not overwrite and self.state_.step > 0:
            logger.warning("The model in %s is already trained (step %d); pass overwrite=True to "
                           "continue training it. Nothing was trained.", self.logdir_,
                           self.state_.step)
            return self
        data, normalizer = self._data, self.normalizer_
        if data is None or self.model_ is None or normalizer is None:
            raise ValueError("No training data: pass X to CompressionVAE(...) or call fit(X).")
        config = TrainConfig(
            learning_rate=learning_rate, num_steps=num_steps, dropout_keep_prob=dropout_keep_prob,
            test_every=test_every, lr_scheduling=lr_scheduling,
            lr_scheduling_steps=lr_scheduling_steps, lr_scheduling_factor=lr_scheduling_factor,
            lr_scheduling_min=lr_scheduling_min, checkpoint_every=checkpoint_every,
            batch_size=self.batch_size, batch_size_test=self.batch_size_test, seed=self.seed_,
        )
        if self.num_workers > 0:
            self._train_on_ray(config)
            return self
        model = self.model_
        optimizer = make_optimizer(model, config)
        scheduler = make_scheduler(optimizer, config)
        state = self.state_
        restart_schedule = (state.converged or not state.optimizer or self.train_config_ is None
                            or self.train_config_.learning_rate != learning_rate)
        if state.optimizer:
            optimizer.load_state_dict(state.optimizer)
        if not restart_schedule:
            scheduler.load_state_dict(state.scheduler)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] if not restart_schedule else learning_rate
        state.converged = False
        state.target_step = state.step + num_steps
        self.train_config_ = config

        batches = data.train_batches(config.batch_size, self.seed_, state.step, normalizer)

        def evaluate() -> ValidationResult:
            model.eval()
            loss, recon, kl, rows = evaluate_batches(
                model, data.valid_batches(config.batch_size_test, normalizer))
            model.train()
            return ValidationResult(loss / rows, recon / rows, kl / rows, rows)

        callbacks = _LocalCallbacks(self, config, total=state.target_step, initial=state.step,
                                    verbose=verbose)
        model.train()
        try:
            with torch.random.fork_rng():
                torch.manual_seed(derive_seed(self.seed_, 2, state.step))
                run_training(model, model, optimizer, scheduler, state, batches, evaluate, config,
                             callbacks)
        except KeyboardInterrupt:
            # As the original: Ctrl-C keeps the model; save it and hand it back usable.
            state.optimizer = optimizer.state_dict()
            state.scheduler = scheduler.state_dict()
            self._save(state, config)
            logger.warning("Training interrupted at step %d; checkpoint saved to %s", state.step,
                           self.logdir_)
        finally:
            callbacks.close()
            model.eval()
        self.state_ = state
        self.restored_ = False
        return self

    def _train_on_ray(self, config: TrainConfig) -> None:
        """The same loop on Ray Train workers, continuing from this estimator's current model."""
        import tempfile

        from pipeline.ray_training import DistributedConfig, run_distributed_training

        data = self._data
        if isinstance(data, ArrayData):
            source, valid = data.train, data.valid
        else:
            source, valid = data.source, data.valid_source  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory(prefix="cvae-initial-") as tmp:
            initial = self.save(Path(tmp) / "checkpoint")
            result = run_distributed_training(
                source, {}, config, DistributedConfig(num_workers=self.num_workers),
                train_valid_split=self.train_valid_split, valid_source=valid,
                initial_checkpoint=initial)
        checkpoint = load_checkpoint(result.checkpoint_dir)
        self._adopt(checkpoint)
        self.restored_ = False
        write_checkpoint_to_logdir(checkpoint, self.logdir_, config.keep_checkpoints)
        self.history_.append({"step": float(result.step), **result.metrics})

    def _save(self, state: TrainState, config: TrainConfig | None) -> Path:
        assert self.model_ is not None and self.model_config_ and self.normalizer_ is not None
        checkpoint = Checkpoint(self.model_config_, self.model_.state_dict(), self.normalizer_,
                                state, config)
        keep = config.keep_checkpoints if config else 2
        return write_checkpoint_to_logdir(checkpoint, self.logdir_, keep)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the current model as one checkpoint directory at ``path``."""
        from cvae_model.checkpoint import save_checkpoint

        model = self._fitted_model()
        assert self.model_config_ and self.normalizer_ is not None
        return save_checkpoint(Checkpoint(self.model_config_, model.state_dict(), self.normalizer_,
                                          self.state_, self.train_config_), path)

    # ------------------------------------------------------------------ use
    def _fitted_model(self) -> VAE:
        if self.model_ is None:
            raise NotFittedError("This CompressionVAE has no model yet: pass X, call fit(X), or "
                                 "point logdir at a trained model.")
        return self.model_

    @torch.no_grad()
    def embed(self, X: Any, batch_size: int = 64) -> np.ndarray:
        """Embed rows of X: float32 array of shape (n_samples, dim_latent).

        Deterministic (z_0 = mu through the flows, no dropout) and independent of batch size.
        """
        model = self._fitted_model()
        assert self.model_config_ and self.normalizer_ is not None
        data = check_features(X, "X", self.model_config_.dim_feature)
        parts = [model.embed(torch.from_numpy(self.normalizer_.transform(chunk))).numpy()
                 for chunk in _in_batches(data, int(batch_size))]
        return np.concatenate(parts).astype(np.float32, copy=False)

    @torch.no_grad()
    def decode(self, z: Any, batch_size: int = 64) -> np.ndarray:
        """Decode latent vectors to feature space (un-normalized): shape (n, n_features)."""
        model = self._fitted_model()
        assert self.model_config_ and self.normalizer_ is not None
        latents = check_latents(z, self.model_config_.dim_latent)
        parts = [self.normalizer_.inverse_transform(model.decode(torch.from_numpy(chunk)).numpy())
                 for chunk in _in_batches(latents, int(batch_size))]
        return np.concatenate(parts).astype(np.float32, copy=False)

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
        self._fitted_model()
        assert self.model_config_ is not None
        if self.model_config_.dim_latent != 2:
            raise ValueError(f"visualize_latent_grid needs dim_latent=2; this model has "
                             f"{self.model_config_.dim_latent}")
        return latent_grid_figure(self.decode, xy_range, grid_size, shape, clip, figsize, filename)

    # ------------------------------------------------------------------ scikit-learn
    def fit(self, X: Any = None, y: Any = None, **train_params: Any) -> CompressionVAE:
        """Prepare X (if given) and train; returns self. ``y`` is ignored."""
        if X is not None:
            self.X = X
            self._prepare_data(X, self.X_valid)
        return self.train(overwrite=True, **train_params)

    def transform(self, X: Any) -> np.ndarray:
        return self.embed(X, batch_size=max(self.batch_size_test, 256))

    def fit_transform(self, X: Any, y: Any = None, **train_params: Any) -> np.ndarray:
        return self.fit(X, y, **train_params).transform(X)

    def inverse_transform(self, z: Any) -> np.ndarray:
        return self.decode(z, batch_size=max(self.batch_size_test, 256))

    _PARAM_NAMES = ("X", "X_valid", "train_valid_split", "dim_latent", "iaf_flow_length",
                    "cells_encoder", "initializer", "batch_size", "batch_size_test", "logdir",
                    "feature_normalization", "tb_logging", "random_state", "num_workers")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._PARAM_NAMES}

    def set_params(self, **params: Any) -> CompressionVAE:
        unknown = set(params) - set(self._PARAM_NAMES)
        if unknown:
            raise ValueError(f"Invalid parameter(s) {sorted(unknown)} for CompressionVAE; valid "
                             f"parameters are {list(self._PARAM_NAMES)}")
        for name, value in params.items():
            setattr(self, name, value)
        self._setup()
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, uri: str | os.PathLike[str]) -> CompressionVAE:
        """Load a trained model from a logdir, a checkpoint directory, or (with
        ``pipeline.registry``) an MLflow URI such as ``models:/NAME@ALIAS``."""
        text = os.fspath(uri)
        if text.startswith(("models:/", "runs:/", "mlflow-artifacts:", "http://", "https://")):
            from pipeline.registry import download_checkpoint

            text = os.fspath(download_checkpoint(text))
        path = Path(os.path.expanduser(text))
        checkpoint_dir = path if (path / "config.json").is_file() else latest_checkpoint(path)
        if checkpoint_dir is None:
            raise FileNotFoundError(f"No cvae model at {path.resolve()}: expected a checkpoint "
                                    "directory or a logdir containing checkpoint-* directories")
        checkpoint = load_checkpoint(checkpoint_dir)
        estimator = cls.__new__(cls)
        cfg = checkpoint.model_config
        estimator.__init__(X=None, dim_latent=cfg.dim_latent,  # type: ignore[misc]
                           iaf_flow_length=cfg.iaf_flow_length,
                           cells_encoder=list(cfg.cells_encoder or ()),
                           initializer=cfg.initializer,
                           feature_normalization=cfg.feature_normalization,
                           logdir=path if checkpoint_dir.parent == path else checkpoint_dir.parent)
        if estimator.model_ is None or checkpoint_dir != latest_checkpoint(estimator.logdir_):
            estimator._adopt(checkpoint)
        return estimator

    @property
    def model_config(self) -> ModelConfig:
        self._fitted_model()
        assert self.model_config_ is not None
        return self.model_config_
