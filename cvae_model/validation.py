"""Checks of user-supplied arrays, with scikit-learn-style messages that say what and where."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_features", "check_latents", "width_mismatch"]


def _as_2d_float32(data: Any, name: str) -> np.ndarray:
    if isinstance(data, (str, bytes)):
        raise TypeError(f"{name} must be an array-like of numbers, got a string {data!r}")
    try:
        array = np.asarray(data)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name} could not be converted to an array: {exc}") from exc
    if array.dtype == object:
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name} has dtype object with non-numeric values; expected numbers ({exc})"
            ) from exc
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise TypeError(f"{name} has dtype {array.dtype}; expected numeric values (int or float)")
    if array.ndim != 2:
        raise ValueError(
            f"Expected a 2D array for {name}, got a {array.ndim}D array of shape {array.shape} "
            "instead. Reshape your data with array.reshape(-1, 1) for a single feature or "
            "array.reshape(1, -1) for a single sample."
        )
    if array.shape[0] == 0:
        raise ValueError(
            f"Found array with 0 sample(s) (shape={array.shape}) in {name} while a minimum of 1 "
            "is required."
        )
    if array.shape[1] == 0:
        raise ValueError(
            f"Found array with 0 feature(s) (shape={array.shape}) in {name} while a minimum of 1 "
            "is required."
        )
    array = array.astype(np.float32, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        kind = "NaN" if np.isnan(array[row, col]) else "infinity"
        count = int((~finite.all(axis=1)).sum())
        raise ValueError(
            f"{name} contains {kind} at row {row}, column {col} ({count} row(s) with NaN or "
            "infinity in all); remove or impute them first."
        )
    return array


def width_mismatch(got: int, expected: int, kind: str = "dim_feature", name: str | None = None) -> str:
    """The one wording of a width mismatch (scikit-learn's): features, or latent dimensions."""
    if kind == "dim_latent":
        return (f"{name or 'z'} has {got} latent dimensions, but this CompressionVAE has "
                f"dim_latent={expected}.")
    return (f"{name or 'X'} has {got} features, but CompressionVAE is expecting {expected} "
            "features as input.")


def check_features(data: Any, name: str = "X", dim_feature: int | None = None) -> np.ndarray:
    """Return ``data`` as a finite float32 array of shape (n, d), or raise naming the problem."""
    array = _as_2d_float32(data, name)
    if dim_feature is not None and array.shape[1] != dim_feature:
        raise ValueError(width_mismatch(array.shape[1], dim_feature, "dim_feature", name))
    return array


def check_latents(z: Any, dim_latent: int, name: str = "z") -> np.ndarray:
    """Return ``z`` as a finite float32 array of shape (n, dim_latent), or raise."""
    array = _as_2d_float32(z, name)
    if array.shape[1] != dim_latent:
        raise ValueError(width_mismatch(array.shape[1], dim_latent, "dim_latent", name))
    return array
