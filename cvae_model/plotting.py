"""Plots of embeddings and of the decoder's view of the latent space.

Functions return a matplotlib ``Figure`` and write a file only when given a path; nothing here
calls ``plt.show()``. Figures are built with the object API (no pyplot global state), so they are
garbage-collected like any object.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["latent_grid_figure", "scatter_figure", "training_curves_figure"]


def _save(fig: Figure, filename: str | os.PathLike[str] | None) -> None:
    if filename is not None:
        path = os.path.expanduser(os.fspath(filename))
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(path, bbox_inches="tight", dpi=100)


def _encode_labels(labels: Any, n: int) -> tuple[np.ndarray, list[str]]:
    """Integer codes and tick names for int or string labels (order: sorted)."""
    values = np.asarray(labels)
    if values.ndim != 1 or values.shape[0] != n:
        raise ValueError(f"labels must be 1-D with one label per point ({n}); got shape {values.shape}")
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(int), []
    if values.dtype.kind in "USO":
        names = sorted({str(v) for v in values})
        index = {name: i for i, name in enumerate(names)}
        return np.array([index[str(v)] for v in values]), names
    if np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)):
        return values.astype(int), []
    raise TypeError(f"labels must be ints or strings; got dtype {values.dtype}")


def scatter_figure(z: np.ndarray, labels: Any = None, categories: Sequence[str] | None = None,
                   filename: str | os.PathLike[str] | None = None, title: str | None = None) -> Figure:
    """Scatter plot of 2-D embeddings, coloured by integer or string labels when given.

    ``categories`` names integer labels (``categories[i]`` for label ``i``); string labels are
    sorted and name themselves.
    """
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[1] != 2:
        raise ValueError(f"visualize needs 2-D embeddings of shape (n, 2); got shape {z.shape}")
    fig = Figure(figsize=(12, 10))
    ax = fig.add_subplot()
    if labels is None:
        ax.scatter(z[:, 0], z[:, 1], s=7, c="tab:blue")
    else:
        codes, names = _encode_labels(labels, z.shape[0])
        if categories is not None and not names:
            names = [str(c) for c in categories]
        low, high = int(codes.min()), int(codes.max())
        sc = ax.scatter(z[:, 0], z[:, 1], s=7, c=codes, cmap="jet", vmin=low - 0.5, vmax=high + 0.5)
        cbar = fig.colorbar(sc, ax=ax, ticks=np.arange(low, high + 1))
        if names:
            cbar.ax.set_yticklabels([names[i] if 0 <= i < len(names) else str(i)
                                     for i in range(low, high + 1)])
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    if title:
        ax.set_title(title)
    _save(fig, filename)
    return fig


def latent_grid_figure(decode: Callable[[np.ndarray], np.ndarray],
                       xy_range: tuple[float, float] = (-4.0, 4.0), grid_size: int = 10,
                       shape: tuple[int, int] = (28, 28), clip: tuple[float, float] = (0, 255),
                       figsize: tuple[float, float] = (12, 12),
                       filename: str | os.PathLike[str] | None = None) -> Figure:
    """Decode the centres of a ``grid_size`` x ``grid_size`` grid over ``xy_range`` and tile them."""
    low, high = xy_range
    h, w = shape
    step = (high - low) / grid_size
    centres = low + step * (np.arange(grid_size) + 0.5)
    # Rows of the image go from high y (top) to low y (bottom), as in a plot.
    zz = np.array([[x, y] for y in centres[::-1] for x in centres], dtype=np.float32)
    images = decode(zz)
    if images.shape[1] != h * w:
        raise ValueError(f"shape={shape} needs {h * w} features, but the model decodes "
                         f"{images.shape[1]}")
    images = np.clip(images, *clip).reshape(grid_size, grid_size, h, w)
    canvas = images.transpose(0, 2, 1, 3).reshape(grid_size * h, grid_size * w)
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot()
    ax.imshow(canvas, cmap="Greys_r", extent=(low, high, low, high))
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    _save(fig, filename)
    return fig


def training_curves_figure(history: Sequence[dict[str, float]],
                           filename: str | os.PathLike[str] | None = None) -> Figure:
    """Train and validation loss and learning rate against the step."""
    steps = [h["step"] for h in history]
    fig = Figure(figsize=(10, 6))
    ax = fig.add_subplot()
    ax.plot(steps, [h["train_loss"] for h in history], label="train loss")
    ax.plot(steps, [h["val_loss"] for h in history], label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("negative ELBO")
    ax.legend(loc="upper left")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [h["learning_rate"] for h in history], color="grey", ls="--",
               label="learning rate")
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate")
    lr_ax.legend(loc="upper right")
    _save(fig, filename)
    return fig
