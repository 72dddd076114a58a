"""Errors about the user's data, and their recovery from inside Ray's task errors."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import numpy as np

__all__ = ["DataValidationError", "raise_data_errors", "show_id"]


class DataValidationError(ValueError):
    """Bad input data; the message names the file, column or row and what was expected."""


_WRAPPED = re.compile(r"DataValidationError: ([^\n]+)")


def show_id(row_id: object) -> str:
    """An id as the user wrote it: ``7`` or ``'a/b.npy'``, not ``np.int64(7)``."""
    return repr(row_id.item() if isinstance(row_id, np.generic) else row_id)


def _raised_by_ray(exc: BaseException) -> bool:
    """Whether ``exc`` is Ray's task error for it: ``ray.get`` raises a ``RayTaskError(X)`` that
    subclasses the task's own error ``X`` but whose text is Ray's traceback."""
    return type(exc).__module__.startswith("ray.")


def _find_data_error(exc: BaseException) -> DataValidationError | None:
    """The ``DataValidationError`` inside a Ray task error, by its cause chain or its text."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DataValidationError) and not _raised_by_ray(current):
            return DataValidationError(str(current).strip())
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    match = _WRAPPED.search(str(exc))
    return None if match is None else DataValidationError(match.group(1).strip())


@contextlib.contextmanager
def raise_data_errors() -> Iterator[None]:
    """Re-raise a ``DataValidationError`` that Ray wrapped in a task error, as itself.

    Ray Data reports a failed task as ``RayTaskError(UserCodeException)`` whose text holds the
    original error among Ray's own lines; the user should see only what was wrong with which
    file, column or row. Other errors pass through unchanged.
    """
    try:
        yield
    except Exception as exc:
        if isinstance(exc, DataValidationError) and not _raised_by_ray(exc):
            raise
        error = _find_data_error(exc)
        if error is None:
            raise
    else:
        return
    # Raised outside the handler, so the new error holds no reference to Ray's exception and its
    # frames: they (and the failed execution's actors, which hold CPUs) are freed at once, even
    # while a caller keeps this error.
    raise error
