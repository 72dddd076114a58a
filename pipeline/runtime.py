"""The Ray runtime a job or the estimator works in: joined or started once, quietly.

``RAY_ADDRESS`` set (``ray job submit``, a cluster): that cluster is joined. Unset: a local
runtime starts on demand. Either way Ray's token authentication keeps its default (on for a new
local runtime, which writes ``~/.ray/auth_token``); cvae never turns it off. A test suite may
turn it off for its own local runtime with ``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

__all__ = ["cpu_shares", "ensure_ray", "token_auth_enabled"]


def ensure_ray(*, progress_bars: bool = False) -> None:
    """Start or join Ray if this process has not; Ray Data's own bars off unless asked."""
    import ray

    if not ray.is_initialized():
        own = signal.getsignal(signal.SIGTERM) if _main_thread() else None
        ray.init(logging_level=logging.WARNING)
        if own not in (None, signal.SIG_DFL):
            # ray.init installs its own SIGTERM handler (exit at once); keep the job's, which
            # unwinds like Ctrl-C so temporary outputs are removed and MLflow runs end KILLED.
            signal.signal(signal.SIGTERM, own)
    ray.data.DataContext.get_current().enable_progress_bars = progress_bars
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def token_auth_enabled() -> bool:
    """Whether this process talks to Ray with token authentication (after ``ensure_ray``)."""
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def cpu_shares(count: int, reserve: float = 0.0) -> tuple[float, int]:
    """(CPUs each of ``count`` workers or actors asks for, torch threads each uses).

    The cluster's CPUs (less ``reserve``, left to Ray Data's read tasks) are shared out, but no
    share exceeds the CPUs of the largest node: a task must fit on one machine.
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    largest = max((float(node["Resources"].get("CPU", 0.0)) for node in ray.nodes()
                   if node.get("Alive")), default=total)
    share = max(0.25, min((total - reserve) / count, largest))
    return share, max(1, int(share))
