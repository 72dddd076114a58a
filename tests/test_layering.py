"""The seam the README's Architecture section describes: the model package stays free of the
pipeline's heavy dependencies, and reaches ``pipeline`` through ``cvae_model/bridge.py`` only."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_importing_cvae_model_loads_neither_ray_nor_mlflow_nor_the_pipeline() -> None:
    script = ("import sys, cvae_model; "
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'pipeline'}))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_only_the_bridge_imports_the_pipeline() -> None:
    importing = sorted(path.name for path in (REPO / "cvae_model").glob("*.py")
                       if re.search(r"^\s*(from|import) pipeline\b", path.read_text(), re.MULTILINE))
    assert importing == ["bridge.py"]
