"""The command line: flags generated from the config dataclasses, with their docs and defaults."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
from conftest import REPO

from cvae_model.config import ModelConfig, TrainConfig
from jobs.arguments import field_docs
from jobs.pack import PackConfig
from pipeline.decoding import DecodeConfig
from pipeline.inference import EmbedConfig
from pipeline.ray_training import DistributedConfig
from pipeline.sources import SourceSpec


def _help(command: str) -> str:
    done = subprocess.run([sys.executable, "-m", "jobs.cli", command, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # argparse wraps lines (also at hyphens): compare words
    return re.sub(r"-\s+", "-", " ".join(done.stdout.split()))


@pytest.mark.parametrize(("command", "configs", "skipped"), [
    ("train", (SourceSpec, ModelConfig, TrainConfig, DistributedConfig), {"dim_feature", "cells_hidden"}),
    ("embed", (SourceSpec, EmbedConfig), set()),
    ("decode", (DecodeConfig,), set()),
    ("pack", (PackConfig,), set()),
])
def test_help_shows_every_field_with_its_description_and_default(
        command: str, configs: tuple[type, ...], skipped: set[str]) -> None:
    text = _help(command)
    for cls in configs:
        docs = field_docs(cls)
        for field in dataclasses.fields(cls):
            if field.name in skipped:
                continue
            flag = "--" + field.metadata.get("flag", field.name).replace("_", "-")
            assert flag in text, flag
            doc = re.sub(r"-\s+", "-", docs[field.name])  # as _help joins argparse's wrapped lines
            assert doc and doc in text, (cls.__name__, field.name)
            default = field.default
            if default is dataclasses.MISSING:
                continue
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            assert f"{doc} (default: {shown})" in text, (cls.__name__, field.name)


def test_each_default_is_defined_once() -> None:
    """The estimator's train() defaults are TrainConfig's (the one place they live)."""
    import inspect

    from cvae_model import CompressionVAE

    signature = inspect.signature(CompressionVAE.train)
    for field in dataclasses.fields(TrainConfig):
        if field.name in signature.parameters:
            assert signature.parameters[field.name].default == field.default, field.name


def test_bad_flags_are_named() -> None:
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--data", "x",
                           "--cells-encoder", "12,a"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert re.search(r"--cells-encoder: expected comma-separated ints like 512,128, got '12,a'",
                     done.stderr)
