"""Cold load of a registered model in a new process, by ``models:/NAME@ALIAS``.

Registers a default 784->2 model in a temporary embedded MLflow store, then starts fresh Python
processes that time: the imports, ``CompressionVAE.load(uri)`` plus a first ``embed``, and
``mlflow.pyfunc.load_model(uri)`` plus a first ``predict``; the whole process wall time beside.
Medians over ``--repeats`` processes.

    python -m benchmarks.cold_load [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import time; t0 = time.perf_counter()
import numpy as np, mlflow
from cvae_model import CompressionVAE
t1 = time.perf_counter()
m = CompressionVAE.load("models:/cold@champion"); m.embed(np.zeros((8, 784), np.float32))
t2 = time.perf_counter()
p = mlflow.pyfunc.load_model("models:/cold@champion"); p.predict(np.zeros((8, 784), np.float32))
t3 = time.perf_counter()
import json; print(json.dumps({"imports": t1 - t0, "estimator": t2 - t1, "pyfunc": t3 - t2}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cvae_cold_"))
    os.environ.update({"CVAE_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        import mlflow

        from cvae_model import CompressionVAE
        from pipeline.registry import register_run_model
        from pipeline.tracking import ensure_experiment

        X = np.random.default_rng(0).random((256, 784), dtype=np.float32)
        model = CompressionVAE(X, logdir=home / "logdir", random_state=0)
        model.train(num_steps=1, verbose=False)
        checkpoint = model.save(home / "checkpoint")
        experiment = ensure_experiment("cold-load")
        run = mlflow.MlflowClient().create_run(experiment)
        register_run_model(run.info.run_id, checkpoint, "cold", aliases=["champion"])
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
        rows = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                                  env=env, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["process"] = time.perf_counter() - start
            rows.append(result)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    print(f"default 784->2 model (960k parameters), embedded SQLite store, median of {args.repeats}")
    print()
    print("| step | seconds |")
    print("|---|---|")
    print(f"| imports (numpy, mlflow, cvae_model) | {med['imports']:.2f} |")
    print(f"| `CompressionVAE.load('models:/cold@champion')` + first embed | {med['estimator']:.2f} |")
    print(f"| `mlflow.pyfunc.load_model(...)` + first predict | {med['pyfunc']:.2f} |")
    print(f"| whole new process (interpreter start to exit) | {med['process']:.2f} |")


if __name__ == "__main__":
    main()
