"""The seam the README's Architecture section describes: the model package stays free of the
pipeline's heavy dependencies, and reaches ``pipeline`` through ``cvae_model/bridge.py`` only."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO


def _top_level_modules_after(statement: str, among: set[str]) -> list[str]:
    script = (f"import json, sys; {statement}; print(json.dumps(sorted("
              f"{{m.split('.')[0] for m in sys.modules}} & set({sorted(among)!r}))))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_importing_cvae_model_loads_neither_ray_nor_mlflow_nor_the_pipeline() -> None:
    loaded = _top_level_modules_after("from cvae_model import CompressionVAE, load",
                                      {"ray", "mlflow", "pipeline", "torch"})
    assert loaded == ["torch"]


def test_a_ray_read_task_does_not_import_torch() -> None:
    """What a Ray Data read task unpickles (``pipeline.sources`` and the readers) must not pull in
    torch through ``cvae_model``: 3 s per new worker process, minutes on a loaded machine (a
    read test timed out waiting for workers that were importing it)."""
    assert _top_level_modules_after("import pipeline.sources, pipeline.npy, pipeline.parquet",
                                    {"torch", "mlflow"}) == []


def test_only_the_bridge_imports_the_pipeline() -> None:
    importing = sorted(path.name for path in (REPO / "cvae_model").glob("*.py")
                       if re.search(r"^\s*(from|import) pipeline\b", path.read_text(), re.MULTILINE))
    assert importing == ["bridge.py"]
