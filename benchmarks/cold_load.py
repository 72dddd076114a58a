"""Cold load of a registered model in a new process, by ``models:/NAME@ALIAS``.

Trains a default 784->2 model for a few steps, logs it with ``pipeline.registry.log_cvae_model``
and registers it as ``cold@champion`` in a temporary embedded (SQLite) store, then starts fresh
Python processes, alternating two ways of loading:

* ``estimator``: ``import mlflow, cvae_model, pipeline.registry`` -> ``CompressionVAE.load(uri)``
  -> first ``embed`` of 8 rows;
* ``pyfunc``: ``import mlflow`` -> ``mlflow.pyfunc.load_model(uri)`` -> first ``predict``
  (torch is imported inside ``load_model``, by the model's ``load_context``).

Each phase is timed inside the child; the parent times the whole process (interpreter start to
exit). Medians over ``--repeats`` processes per way. ``--tracking-uri`` measures against another
store (e.g. a running ``mlflow server``) instead.

    python -m benchmarks.cold_load [--repeats 5] [--tracking-uri http://127.0.0.1:5000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]

logger = logging.getLogger("cvae.benchmarks.cold_load")
URI = "models:/cold@champion"
REPO = Path(__file__).resolve().parents[1]

CHILDREN = {
    "estimator": f"""
import time; t0 = time.perf_counter()
import json, numpy as np, mlflow
from cvae_model import CompressionVAE
import pipeline.registry
t1 = time.perf_counter()
m = CompressionVAE.load({URI!r})
t2 = time.perf_counter()
m.embed(np.zeros((8, 784), np.float32))
t3 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "load": t2 - t1, "first_predict": t3 - t2}}))
""",
    "pyfunc": f"""
import time; t0 = time.perf_counter()
import json, numpy as np, mlflow
t1 = time.perf_counter()
m = mlflow.pyfunc.load_model({URI!r})
t2 = time.perf_counter()
m.predict(np.zeros((8, 784), np.float32))
t3 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "load": t2 - t1, "first_predict": t3 - t2}}))
""",
}


def _register_model(home: Path) -> None:
    import mlflow

    from cvae_model import CompressionVAE
    from pipeline.registry import log_cvae_model, register
    from pipeline.tracking import ensure_experiment

    X = np.random.default_rng(0).random((256, 784), dtype=np.float32)
    model = CompressionVAE(X, logdir=home / "logdir", random_state=0)
    model.train(num_steps=1, verbose=False)
    mlflow.set_experiment(experiment_id=ensure_experiment("cold-load"))
    with mlflow.start_run():
        info = log_cvae_model(model.save(home / "checkpoint"))
    register(info.model_uri, "cold", ["champion"])


def _run_child(kind: str, env: dict[str, str]) -> dict[str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILDREN[kind]], capture_output=True, text=True,
                          env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the {kind} child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process"] = wall
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tracking-uri", default=None,
                        help="store to register into and load from (default: a temporary "
                             "embedded SQLite store)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    home = Path(tempfile.mkdtemp(prefix="cvae_cold_"))
    os.environ.update({"CVAE_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    else:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        _register_model(home)
        import mlflow

        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
               "PYTHONPATH": str(REPO)}
        rows: dict[str, list[dict[str, float]]] = {kind: [] for kind in CHILDREN}
        for _ in range(args.repeats):
            for kind in CHILDREN:  # alternate, so drifting machine load hits both alike
                rows[kind].append(_run_child(kind, env))
    finally:
        shutil.rmtree(home, ignore_errors=True)

    load = os.getloadavg()[0]
    store = "mlflow server" if args.tracking_uri else "embedded SQLite store"
    print(f"default 784->2 model (960k parameters), {store}, `{URI}`, median of "
          f"{args.repeats} fresh processes each; load average {load:.1f} at the end")
    print()
    print("| way | imports s | load s | first predict (8 rows) s | in-process total s | "
          "whole process s |")
    print("|---|---|---|---|---|---|")
    names = {"estimator": "`CompressionVAE.load(uri)` + `embed`",
             "pyfunc": "`mlflow.pyfunc.load_model(uri)` + `predict`"}
    for kind, results in rows.items():
        med = {k: float(np.median([r[k] for r in results])) for k in results[0]}
        total = float(np.median([r["imports"] + r["load"] + r["first_predict"] for r in results]))
        print(f"| {names[kind]} | {med['imports']:.2f} | {med['load']:.2f} | "
              f"{med['first_predict']:.3f} | {total:.2f} | {med['process']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
