"""`make demo` in small: the whole story runs and leaves what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_smoke_demo_trains_registers_embeds_and_plots(ray_session: Any, tmp_path: Path) -> None:
    home, out = tmp_path / "home", tmp_path / "demo"
    env = {**os.environ, "CVAE_HOME": str(home),
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "jobs.demo", "--smoke", "--output", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=450)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["registered_model"] == "models:/cvae-demo@champion"
    assert summary["embedded_rows"] == 1797
    for name in ("embedding", "latent_grid", "training_curves"):
        path = Path(summary["plots"][name])
        assert path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "data" / "npy").rglob("*.npy"))) == 1797

    import mlflow

    from pipeline.outputs import read_output

    table = read_output(summary["embeddings"])
    assert table.num_rows == 1797 and len(set(table.column("id").to_pylist())) == 1797
    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    version = client.get_model_version_by_alias("cvae-demo", "champion")
    assert version.run_id == summary["mlflow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "plots")}
    assert artifacts == {"plots/embedding.png", "plots/latent_grid.png", "plots/training_curves.png"}
    assert "mlflow ui --backend-store-uri sqlite:///" in done.stdout
    # A log with stderr to a file is readable: whole lines, no per-step bar fragments.
    assert "\r" not in done.stderr
