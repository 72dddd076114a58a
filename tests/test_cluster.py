"""A real 2-node cluster without a shared filesystem: the commands the README's cluster section shows.

- Data, Ray Train storage, models and outputs live only on an S3 server (moto's, real clients).
- MLflow is a tracking server whose artifacts are proxied to S3 (``--artifacts-destination``):
  the nodes and the jobs reach it over HTTP and hold no MLflow storage settings.
- The head node runs here; the worker node runs in its own mount namespace with a private
  ``/tmp`` (``unshare --mount`` and a tmpfs), so it cannot read any file the test or the driver
  writes under ``/tmp``. The nodes hold no object-store credentials: each job carries them in its
  runtime environment, and the filesystems the driver resolves travel with the work.
- Ray's token authentication is on, as a user runs it: ``RAY_AUTH_MODE=token`` and
  ``RAY_AUTH_TOKEN`` for the head, the worker and the job submission.
- Jobs are submitted with ``ray job submit ... -- cvae ...`` (cvae is installed on the nodes).

On it: 2-worker training spread over both nodes whose worker-node trainer is killed mid-run and
restarts from its S3 checkpoint, registration, bulk embedding of an S3 parquet and of an S3
``.npy`` tree, decoding; ids, row counts and values are checked against the estimator.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from s3_helpers import S3, free_port, moto_server, s3, s3_env  # noqa: F401 - fixtures

BIN = Path(sys.executable).parent
N = 400
"""Rows of the data sets (a tree of N .npy files and the same rows as parquet)."""
STEPS = 600
"""Training steps: enough time after the first checkpoint to kill a trainer mid-run."""
_SERVE = "--model models:/cluster-model@champion --num-actors 2 --no-progress"
JOBS = {
    "train": ("cvae train --data {bucket}/tree --storage-path {bucket}/ray --run-name cluster "
              f"--num-workers 2 --placement-strategy SPREAD --num-steps {STEPS} --test-every 100 "
              "--checkpoint-every 100 --no-lr-scheduling --cells-encoder 16,8 --iaf-flow-length 1 "
              "--dim-latent 2 --save-model {bucket}/models/cluster --register-as cluster-model "
              "--alias champion"),
    "embed_table": ("cvae embed --data {bucket}/table --column x --id-column key "
                    "--output {bucket}/z_table " + _SERVE),
    "embed_tree": "cvae embed --data {bucket}/tree --output {bucket}/z_tree " + _SERVE,
    "decode": "cvae decode --latents {bucket}/z_table --output {bucket}/x_table " + _SERVE,
}
"""The cvae commands the test submits, in the README's cluster section with ``s3://bucket``."""


def _job(name: str, bucket: str) -> str:
    return JOBS[name].format(bucket=bucket)


def test_the_readme_shows_the_commands_this_test_submits() -> None:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Running on a cluster"):]
    section = section[:section.index("\n## ", 1)]
    shown = re.sub(r"\s+", " ", section.replace("\\\n", " "))  # shell continuations joined
    for name in JOBS:
        assert _job(name, "s3://bucket") in shown, f"README's cluster section lacks {name}"


@dataclass
class Cluster:
    dashboard: str
    token: str
    mlflow: str
    worker_pid: int
    """The worker node's ``ray start --block`` process (in the private mount namespace)."""
    logs: Path

    @property
    def client_env(self) -> dict[str, str]:
        """What ``ray job submit`` needs: the address's token, nothing else of the cluster."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS", "CVAE_"))}
        return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}

    def state(self, resource: str) -> list[dict[str, Any]]:
        """Ray's state API (``/api/v0/<resource>``), authenticated with the cluster's token."""
        request = urllib.request.Request(f"{self.dashboard}/api/v0/{resource}?limit=10000&detail=1",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            data = json.loads(response.read())["data"]["result"]
        return data["result"] if isinstance(data, dict) else data


def _stop_processes_under(*marks: str) -> None:
    """Stop this cluster's processes only (`ray stop` would stop every Ray on the machine)."""
    import psutil

    victims = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(mark in cmdline for mark in marks) and proc.pid != os.getpid():
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


def _own_ports() -> list[str]:
    # Every port a node listens on, free: the test session's own Ray runtime (and other Ray
    # clusters on this machine) hold the defaults.
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def _wait_http(url: str, what: str, proc: subprocess.Popen[bytes], log: Path, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"{what} did not come up at {url}: {log.read_text()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture()
def cluster(s3: S3, tmp_path: Path) -> Iterator[Cluster]:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail("`unshare --mount` is refused on this machine (" + probe.stderr.strip()
                    + "): the cluster test needs a worker node in its own mount namespace with a "
                    "private /tmp; run it as root or with CAP_SYS_ADMIN (e.g. a privileged container)")
    token = secrets.token_hex(32)
    # Ray's socket paths must stay short (AF_UNIX: 107 bytes): not pytest's tmp_path.
    head_dir, worker_dir = f"/tmp/rch{os.getpid()}", f"/tmp/rcw{os.getpid()}"
    node_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS", "CVAE_"))}
    node_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
                    PATH=f"{BIN}{os.pathsep}{node_env.get('PATH', '')}")
    logs = tmp_path / "logs"
    logs.mkdir()

    # The MLflow server alone holds the S3 settings of its artifact store.
    mlflow_port = free_port()
    mlflow_env = {**node_env, **s3_env(s3.endpoint), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
                  "MLFLOW_DISABLE_TELEMETRY": "true"}
    mlflow_log = logs / "mlflow.log"
    with open(mlflow_log, "wb") as out:
        mlflow = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
             "--artifacts-destination", s3.uri("mlflow"), "--host", "127.0.0.1",
             "--port", str(mlflow_port), "--workers", "1"],
            env=mlflow_env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
            start_new_session=True)
    gcs_port, dash_port = free_port(), free_port()
    head = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
            "--num-cpus=1", '--resources={"head_node": 1}', f"--temp-dir={head_dir}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={free_port()}", "--disable-usage-stats", *_own_ports()]
    worker = ["ray", "start", f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1",
              "--num-cpus=1", '--resources={"worker_node": 1}', f"--temp-dir={worker_dir}",
              "--disable-usage-stats", "--block", *_own_ports()]
    in_namespace = f"mount -t tmpfs tmpfs /tmp && mkdir -p {worker_dir} && exec {' '.join(map(_quote, worker))}"
    worker_proc = None
    try:
        started = subprocess.run(head, env=node_env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr[-3000:]
        with open(logs / "worker.log", "wb") as out:
            worker_proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "bash", "-c", in_namespace],
                env=node_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        found = Cluster(f"http://127.0.0.1:{dash_port}", token, f"http://127.0.0.1:{mlflow_port}",
                        worker_proc.pid, logs)
        deadline = time.time() + 120
        while len([n for n in _try_state(found, "nodes") if n.get("state") == "ALIVE"]) < 2:
            if worker_proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the worker node did not join: {(logs / 'worker.log').read_text()[-3000:]}")
            time.sleep(1)
        _wait_http(f"{found.mlflow}/health", "mlflow server", mlflow, mlflow_log, 120)
        yield found
    finally:
        if worker_proc is not None:
            worker_proc.terminate()
        _stop_processes_under(head_dir, worker_dir)
        os.killpg(mlflow.pid, signal.SIGTERM)
        try:
            mlflow.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(mlflow.pid, signal.SIGKILL)
        shutil.rmtree(head_dir, ignore_errors=True)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def _try_state(cluster: Cluster, resource: str) -> list[dict[str, Any]]:
    try:
        return cluster.state(resource)
    except OSError:
        return []


def _submit(cluster: Cluster, env_vars: dict[str, str], command: str) -> list[str]:
    """The ``ray job submit`` command line a user types (waits for the job, exits 1 if it fails)."""
    return ["ray", "job", "submit", "--address", cluster.dashboard,
            "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *command.split()]


def _summary(output: str) -> dict[str, Any]:
    """A job's JSON summary: an indented object from a "{" line to a "}" line."""
    match = re.search(r"^\{$.*?^\}$", output, re.MULTILINE | re.DOTALL)
    assert match, output[-4000:]
    return json.loads(match.group(0))


def _run_job(cluster: Cluster, env_vars: dict[str, str], command: str, timeout: float = 300) -> dict[str, Any]:
    done = subprocess.run(_submit(cluster, env_vars, command), env=cluster.client_env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return _summary(done.stdout)


def _upload(s3: S3, rows: np.ndarray) -> list[str]:
    """``rows`` as an S3 tree ``tree/c*/i.npy`` and as 2 parquet objects ``table/`` (ids k0...)."""
    fs = s3.fs
    for i, row in enumerate(rows):
        data = io.BytesIO()
        np.save(data, row)
        with fs.open_output_stream(f"{s3.bucket}/tree/c{i % 4}/{i}.npy") as out:
            out.write(data.getvalue())
    for part, chunk in enumerate((slice(0, N // 2), slice(N // 2, N))):
        pq.write_table(pa.table({"key": [f"k{i}" for i in range(N)][chunk],
                                 "x": pa.FixedShapeTensorArray.from_numpy_ndarray(rows[chunk])}),
                       f"{s3.bucket}/table/{part}.parquet", filesystem=fs)
    return sorted(f"c{i % 4}/{i}.npy" for i in range(N))


def _kill_worker_node_trainer(cluster: Cluster, s3: S3, worker_node: str,
                              train: subprocess.Popen[str]) -> int:
    """Once Ray Train has recorded a checkpoint on S3, SIGKILL the trainer on the worker node."""
    snapshot = f"{s3.bucket}/ray/cluster/checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while time.time() < deadline and train.poll() is None:
        try:
            with s3.fs.open_input_stream(snapshot) as stream:
                if b"checkpoint_" in stream.read():
                    break
        except OSError:
            pass
        time.sleep(0.25)
    assert train.poll() is None, "the training job ended before a checkpoint was recorded"
    trainers = [a for a in cluster.state("actors") if a.get("class_name") == "RayTrainWorker"
                and a.get("state") == "ALIVE" and a.get("node_id") == worker_node]
    assert len(trainers) == 1, trainers
    pid = int(trainers[0]["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_s3_only_jobs_on_a_cluster_whose_worker_node_cannot_see_the_heads_files(
        cluster: Cluster, s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from cvae_model import CompressionVAE
    from pipeline.outputs import read_manifest, read_output

    clock, phases = time.perf_counter(), {}

    def phase(name: str) -> None:
        nonlocal clock
        phases[name], clock = round(time.perf_counter() - clock, 1), time.perf_counter()

    rng = np.random.default_rng(0)
    rows = (rng.normal(size=(N, 4)) @ rng.normal(size=(4, 16))).astype(np.float32)
    names = _upload(s3, rows)
    phase("upload")
    nodes = {n["node_id"]: n for n in cluster.state("nodes") if n.get("state") == "ALIVE"}
    (worker_node,) = [i for i, n in nodes.items() if "worker_node" in n.get("resources_total", {})]
    (head_node,) = [i for i, n in nodes.items() if "head_node" in n.get("resources_total", {})]

    # The worker node really has a /tmp of its own: it cannot see what the test wrote there.
    marker = tmp_path / "written-by-the-test"
    marker.write_text("the head's file")
    raylet = [a for a in _processes_of(cluster.worker_pid) if "raylet" in a[1]]
    assert raylet, "no raylet under the worker node's process"
    pid = raylet[0][0]
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert not os.path.exists(f"/proc/{pid}/root{marker}")  # (seen through its mount namespace)

    # What every job carries: where S3 is and its keys, and the tracking server. Nothing else.
    env_vars = {**s3_env(s3.endpoint), "MLFLOW_TRACKING_URI": cluster.mlflow}
    train_cmd = _job("train", s3.uri())
    with open(cluster.logs / "train.log", "w") as out:
        train = subprocess.Popen(_submit(cluster, env_vars, train_cmd), env=cluster.client_env,
                                 stdout=out, stderr=subprocess.STDOUT, text=True)
    killed = _kill_worker_node_trainer(cluster, s3, worker_node, train)
    assert train.wait(600) == 0, (cluster.logs / "train.log").read_text()[-5000:]
    summary = _summary((cluster.logs / "train.log").read_text())
    phase("train (killed trainer, restart), register")
    assert summary["step"] == STEPS and summary["model"] == s3.uri("models/cluster")
    assert summary["registered"] == "models:/cluster-model/1"

    trainers = [a for a in cluster.state("actors") if a.get("class_name") == "RayTrainWorker"]
    assert {a["node_id"] for a in trainers} == {head_node, worker_node}  # spread over both nodes
    assert killed in {int(a["pid"]) for a in trainers} and len(trainers) >= 4  # a second worker group
    client = mlflow.MlflowClient(cluster.mlflow)
    history = client.get_metric_history(summary["mlflow_run_id"], "val_loss")
    assert sorted({m.step for m in history}) == list(range(0, STEPS + 1, 100))
    assert [m.step for m in history].count(0) == 1  # the restart resumed from S3, not from scratch
    checkpoints = {k.split("/")[2] for k in s3.keys("ray/cluster/") if k.count("/") == 3}
    assert checkpoints and all(c.startswith("checkpoint_") for c in checkpoints)
    assert [k for k in s3.keys("mlflow/") if k.endswith("/model.pt")]  # artifacts proxied to S3

    model = "models:/cluster-model@champion"
    before = {a["actor_id"] for a in cluster.state("actors")}
    table = _run_job(cluster, env_vars, _job("embed_table", s3.uri()))
    phase("embed parquet")
    # The job's actors (whatever their class) ran on both nodes.
    embedders = [a for a in cluster.state("actors") if a["actor_id"] not in before
                 and a.get("class_name") != "JobSupervisor"]
    assert {a["node_id"] for a in embedders} == {head_node, worker_node}, embedders
    tree = _run_job(cluster, env_vars, _job("embed_tree", s3.uri()))
    phase("embed tree")
    decoded = _run_job(cluster, env_vars, _job("decode", s3.uri()))
    phase("decode")
    assert table["rows_out"] == tree["rows_out"] == decoded["rows"] == N
    assert table["model_version"] == "1"

    # The estimator, loaded from the registry through the tracking server alone.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster.mlflow)
    estimator = CompressionVAE.load(model)
    ids = [f"k{i}" for i in range(N)]
    z_table = read_output(s3.uri("z_table")).to_pandas().set_index("id")
    assert sorted(z_table.index) == sorted(ids) and read_manifest(s3.uri("z_table"))["rows_out"] == N
    z = np.stack(z_table.loc[ids, "embedding"])
    np.testing.assert_allclose(z, estimator.embed(rows), rtol=0, atol=1e-5)
    z_tree = read_output(s3.uri("z_tree")).to_pandas().set_index("id")
    assert sorted(z_tree.index) == names
    np.testing.assert_allclose(np.stack(z_tree.loc[[f"c{i % 4}/{i}.npy" for i in range(N)], "embedding"]),
                               estimator.embed(rows), rtol=0, atol=1e-5)
    x = read_output(s3.uri("x_table")).to_pandas().set_index("id")
    assert sorted(x.index) == sorted(ids)
    np.testing.assert_allclose(np.stack(x.loc[ids, "features"]), estimator.decode(z), rtol=0, atol=1e-5)
    phase("checks")
    print("cluster test phases (s):", phases)


def _processes_of(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of ``root`` and every process below it."""
    import psutil

    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return []
    return [(p.pid, " ".join(p.cmdline())) for p in procs if p.is_running()]
