"""Real servers for tests: an ``mlflow server`` subprocess on a free loopback port, and stopping it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server started with start_new_session=True: its whole process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def server_env() -> dict[str, str]:
    # `mlflow models serve` starts `uvicorn` by name: the virtualenv's bin must be on PATH (as
    # when it is activated). PYTHONPATH: the served model needs only its own code_paths, but the
    # fresh processes import cvae_model from the repository.
    return {**os.environ, "PYTHONPATH": str(REPO),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@contextmanager
def running_mlflow_server(folder: Path, *, artifacts_destination: str | None = None,
                          port: int | None = None, env: Mapping[str, str] | None = None
                          ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``mlflow server`` with its SQLite store in ``folder`` and artifacts proxied through it
    (to ``artifacts_destination``, default ``folder/server-artifacts``); yields (URI, process)."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    destination = artifacts_destination or str(folder / "server-artifacts")
    with open(folder / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", destination, "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**server_env(), **(env or {})})
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", proc, 90)
            yield f"http://127.0.0.1:{port}", proc
        finally:
            stop(proc)
