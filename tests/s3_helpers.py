"""A real S3 API for the tests: moto's standalone server, one per pytest session.

``moto_server`` starts ``moto_server`` (the ``moto[server]`` test extra) as a subprocess on a free
127.0.0.1 port; ``s3`` gives one test its own bucket and the standard AWS variables
(``AWS_ENDPOINT_URL``, keys, region) in its environment, so pyarrow, boto3, Ray and MLflow find
the server as they would find a real one. Nothing is patched: the clients are the real ones.

Import the fixtures into a test module (``from s3_helpers import moto_server, s3``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["S3", "free_port", "make_bucket", "moto_server", "s3", "s3_env"]

KEYS = {"AWS_ACCESS_KEY_ID": "cvae-test", "AWS_SECRET_ACCESS_KEY": "cvae-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables every S3 client here reads: endpoint, keys, region."""
    return {"AWS_ENDPOINT_URL": endpoint, **KEYS}


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL (``http://127.0.0.1:PORT``) of a moto S3 server for the whole session."""
    binary = Path(sys.executable).with_name("moto_server")
    if not binary.exists():
        pytest.fail(f"{binary} is missing: install the test extra (pip install -e '.[test]', "
                    "which brings moto[server])")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except urllib.error.HTTPError:
            break  # it answers: up
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start on {endpoint}: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    try:
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass(frozen=True)
class S3:
    """One test's bucket on the moto server."""

    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    def uri(self, key: str = "") -> str:
        """``s3://BUCKET/key``."""
        return f"s3://{self.bucket}/{key.lstrip('/')}".rstrip("/")

    @property
    def fs(self) -> object:
        """A pyarrow filesystem on the server, built explicitly (independent of cvae's code)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, access_key=KEYS["AWS_ACCESS_KEY_ID"],
                                 secret_key=KEYS["AWS_SECRET_ACCESS_KEY"], region="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (bucket-relative), sorted; not the empty ``.../``
        folder markers pyarrow leaves after deleting a folder's contents (to keep its parent)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **_boto_keys())
        found: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                     Prefix=prefix):
            found += [item["Key"] for item in page.get("Contents", []) if not item["Key"].endswith("/")]
        return sorted(found)


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"}


def make_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket (a fresh, unique name unless given); its name."""
    import boto3

    bucket = name or f"cvae-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, **_boto_keys()).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture()
def s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> S3:
    """A fresh bucket, and the AWS variables pointing at the server in this test's environment."""
    for key, value in s3_env(moto_server).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CVAE_FS_OPTIONS", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return S3(moto_server, make_bucket(moto_server))

