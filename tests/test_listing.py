"""Listing a tree: the streamed walk yields sorted()'s order; PathList holds paths compactly."""

from __future__ import annotations

import bisect
import os
import sys
from pathlib import Path

import pytest

import pipeline.listing as listing
from pipeline.listing import PathList, list_files
from pipeline.npy import NpyItems
from pipeline.storage import resolve

# Names chosen so that a folder-by-folder walk in plain name order would differ from sorted():
# '.' (0x2e) and '-' (0x2d) sort before '/' (0x2f), which sorts before letters and digits.
TRICKY = ["a/x.npy", "a/b/y.npy", "a.b/z.npy", "a-c.npy", "ab.npy", "a0/q.npy", "A.npy",
          "é/e.npy", "zz/deep/er/w.npy", "a/b.npy", "a/b-c/v.npy", "b.npy"]


def _write(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_the_streamed_walk_yields_sorteds_order(tmp_path: Path) -> None:
    _write(tmp_path, [*TRICKY, ".hidden/h.npy", "_tmp/t.npy", "a/.x.npy", "a/notes.txt"])
    listed = list(list_files(resolve(str(tmp_path)), (".npy",)))
    assert listed == sorted(TRICKY)
    plain = sorted(os.path.relpath(os.path.join(d, f), tmp_path)
                   for d, _, files in os.walk(tmp_path) for f in files
                   if f.endswith(".npy") and not any(p.startswith((".", "_")) for p in
                                                     os.path.relpath(os.path.join(d, f), tmp_path).split("/")))
    assert listed == plain


def test_a_link_back_into_the_tree_is_skipped_once_and_named(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path, ["b/one.npy", "c/two.npy"])
    (tmp_path / "b" / "up").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "d").symlink_to(tmp_path / "c", target_is_directory=True)
    with caplog.at_level("WARNING", logger="cvae.storage"):
        listed = list(list_files(resolve(str(tmp_path)), (".npy",)))
    assert listed == ["b/one.npy", "c/two.npy"]
    assert "up: a link to a folder already read" in caplog.text
    assert "d: a link to a folder already read" in caplog.text


def test_a_path_list_reads_like_the_list_it_was_made_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listing, "_CHUNK", 7)  # many chunks: slices cross their boundaries
    paths = sorted(f"f{i:03d}/{i}.npy" for i in range(49)) + ["f049/é ü.npy", "z.parquet"]
    held = PathList(iter(paths))
    assert len(held) == len(paths) and held.arrow.num_chunks == 8
    assert list(held) == paths
    assert [held[i] for i in (0, 6, 7, 49, -1, -51)] == [paths[i] for i in (0, 6, 7, 49, -1, -51)]
    for cut in (slice(5, 16), slice(0, 0), slice(45, 99), slice(-3, None), slice(2, 30, 9)):
        assert held[cut] == paths[cut]
    with pytest.raises(IndexError, match="51 paths"):
        held[51]
    assert bisect.bisect_left(held, "f020/") == bisect.bisect_left(paths, "f020/") == 20
    assert held.count_endswith(".npy") == 50 and held.count_endswith(".parquet") == 1
    assert held.first_endswith(".parquet") == "z.parquet" and held.first_endswith(".csv") is None
    assert len(PathList([])) == 0 and list(PathList([])) == []


def test_a_path_list_holds_far_less_than_python_strings() -> None:
    paths = [f"rest/d{i // 1000:04d}/{i:07d}.npy" for i in range(200_000)]
    as_strings = sum(sys.getsizeof(p) + 8 for p in paths)  # each string and its list slot
    held = PathList(paths)
    assert held.arrow.nbytes <= 0.45 * as_strings


def test_items_are_made_on_demand_and_cover_every_file_once() -> None:
    files = PathList(f"{i:05d}.npy" for i in range(10_007))
    items = NpyItems(files, start=3, per_item=1000)
    assert len(items) == 11
    made = list(items)
    assert [item["index"] for item in made] == list(range(11))
    assert [p for item in made for p in item["paths"]] == list(files)[3:]
    assert made[-1]["rows"] == 4 and items[-1] == made[-1] and items[2] == made[2]
    with pytest.raises(IndexError):
        items[11]
