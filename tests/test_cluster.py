"""A real 2-node Ray cluster on this machine: jobs submitted with a working_dir runtime_env."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def two_node_cluster(tmp_path: Path) -> Iterator[dict[str, str]]:
    # Ray's socket paths must stay short (AF_UNIX limit of 107 bytes): not pytest's tmp_path.
    temp_dir = Path(f"/tmp/rc{os.getpid()}")
    # Each node gets its own temp dir, as separate machines would: nodes sharing one would share
    # the runtime_env cache, and one node's agent deletes the working_dir under the other's job.
    worker_temp_dir = Path(f"/tmp/rc{os.getpid()}w")
    gcs_port, dash_port = _free_port(), _free_port()
    # The nodes run job entrypoints (`python -m jobs...`) with this virtualenv, as a cluster
    # whose nodes have cvae's dependencies installed would.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    def own_ports() -> list[str]:
        # Every port a node listens on, free: the test session's own Ray runtime holds the
        # defaults (a second dashboard agent on its port leaves the cluster unable to take jobs).
        return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}",
                f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]

    head = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
            "--num-cpus=1", '--resources={"head_node": 1}', f"--temp-dir={temp_dir}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}", "--disable-usage-stats", *own_ports()]
    worker = [RAY, "start", f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1",
              "--num-cpus=1", '--resources={"second_node": 1}', f"--temp-dir={worker_temp_dir}",
              *own_ports()]
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=120)
        subprocess.run(worker, check=True, env=env, capture_output=True, timeout=120)
        yield {"gcs": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash_port}"}
    finally:
        _stop_processes_under(temp_dir, worker_temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(worker_temp_dir, ignore_errors=True)


def _stop_processes_under(*dirs: Path) -> None:
    """Stop this cluster's processes only (`ray stop` would also stop the session's runtime)."""
    import psutil

    marks = [str(d) for d in dirs]
    victims = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(mark in cmdline for mark in marks):
            victims.append(proc)
    for proc in victims:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _wait(client: object, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)  # type: ignore[attr-defined]
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status)
        time.sleep(2)
    client.stop_job(job_id)  # type: ignore[attr-defined]
    return "TIMEOUT"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_and_embed_jobs_on_a_two_node_cluster(two_node_cluster: dict[str, str],
                                                   tmp_path: Path) -> None:
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes, list_tasks

    rng = np.random.default_rng(0)
    tree = tmp_path / "tree"
    for i in range(400):
        (tree / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        np.save(tree / f"c{i % 4}" / f"{i}.npy", rng.normal(size=12).astype(np.float32))
    home = tmp_path / "home"
    client = JobSubmissionClient(two_node_cluster["dashboard"])
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": [".venv", ".git", "cvae_runs", "demo_output", "*.npy", "*.parquet"],
        "env_vars": {"CVAE_HOME": str(home), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                     "MLFLOW_DISABLE_TELEMETRY": "true"},
    }
    train_id = client.submit_job(
        entrypoint=(f"python -m jobs.train --data {tree} --num-workers 2 --num-steps 100 "
                    "--test-every 50 --checkpoint-every 100 --cells-encoder 16,8 "
                    "--iaf-flow-length 1 --placement-strategy SPREAD --run-name cluster "
                    "--register-as cluster-model --alias champion --quiet"),
        runtime_env=runtime_env)
    status = _wait(client, train_id, 400)
    logs = client.get_job_logs(train_id)
    assert status == "SUCCEEDED", logs[-4000:]
    # The job prints its summary as indented JSON: a "{" line through a "}" line.
    summary = json.loads(re.search(r"^\{$.*?^\}$", logs, re.MULTILINE | re.DOTALL).group(0))
    assert summary["step"] == 100

    embed_out = tmp_path / "embeddings"
    embed_id = client.submit_job(
        entrypoint=(f"python -m jobs.embed --model models:/cluster-model@champion --data {tree} "
                    f"--output {embed_out} --num-actors 2"),
        runtime_env=runtime_env)
    status = _wait(client, embed_id, 300)
    logs = client.get_job_logs(embed_id)
    assert status == "SUCCEEDED", logs[-4000:]
    import pyarrow.parquet as pq

    table = pq.read_table(embed_out)
    assert table.num_rows == 400
    assert sorted(table.column("id").to_pylist()) == sorted(
        str(p.relative_to(tree)) for p in tree.rglob("*.npy"))

    # Work ran on both nodes.
    address = two_node_cluster["dashboard"]
    nodes = {n.node_id for n in list_nodes(address=address)}
    assert len(nodes) == 2
    used = {t.node_id for t in list_tasks(address=address, limit=10_000, detail=True) if t.node_id}
    assert used == nodes, (used, nodes)
