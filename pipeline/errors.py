"""Errors about the user's data, and their recovery from inside Ray's task errors."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import numpy as np

__all__ = ["DataValidationError", "raise_data_errors", "release_ray_references", "show_id"]


class DataValidationError(ValueError):
    """Bad input data; the message names the file, column or row and what was expected."""


_WRAPPED = re.compile(r"DataValidationError: ([^\n]+)")


def show_id(row_id: object) -> str:
    """An id as the user wrote it: ``7`` or ``'a/b.npy'``, not ``np.int64(7)``."""
    return repr(row_id.item() if isinstance(row_id, np.generic) else row_id)


def _find_data_error(exc: BaseException) -> DataValidationError | None:
    """The ``DataValidationError`` inside a Ray task error, by its cause chain or its text."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DataValidationError):
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
    except DataValidationError:
        raise
    except Exception as exc:
        error = _find_data_error(exc)
        if error is None:
            raise
    else:
        return
    # Raised outside the handler, so the new error holds no reference to Ray's exception and its
    # frames: they (and the failed execution's actors, which hold CPUs) are freed at once, even
    # while a caller keeps this error.
    raise error


def release_ray_references(error: BaseException) -> None:
    """Drop what ties a data error to Ray's failed execution, so its actors free their CPUs now.

    The error we raise names the bad file or row; Ray's task error (its ``__context__``) and the
    finished frames under the handler (which hold it) would otherwise keep the failed execution's
    executor and actors alive for as long as the caller keeps the error (a notebook, a test).
    """
    error.__context__ = None
    tb = error.__traceback__
    while tb is not None:
        try:
            tb.tb_frame.clear()  # only finished frames can be cleared; ours are still running
        except RuntimeError:
            pass
        tb = tb.tb_next
