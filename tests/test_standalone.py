"""The repository stands alone: a user who clones it has nothing beside it.

Development machines keep a folder of reference data and notes next to the checkout; no tracked
file (code, test, benchmark default, doc, config) may read or even mention it, or the README's
commands would fail on a fresh clone the way they once did.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folder as a relative path, as a quoted path component in code, and the
# image sample inside it. Spelled in pieces so that this file does not match itself.
_NAME = "sha" + "red"
OUTSIDE = re.compile(r"\.\./" + _NAME + r"|[\"']" + _NAME + r"[\"']|imagenet" + r"-sample")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def mentions(text: str) -> list[str]:
    return [line.strip()[:100] for line in text.splitlines() if OUTSIDE.search(line)]


def test_no_tracked_file_mentions_anything_outside_the_repository() -> None:
    files = tracked_files()
    assert len(files) > 20
    hits = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary assets, or a file deleted in the working tree
        hits += [f"{path.relative_to(ROOT)}: {line}" for line in mentions(text)]
    assert not hits, "tracked files refer to a folder beside the checkout:\n" + "\n".join(hits)


def test_the_scan_catches_each_spelling() -> None:
    """The scan above must be able to fail: each way the folder was once referred to is a hit."""
    spellings = [
        "IMAGES = ROOT.parent / " + '"' + _NAME + '"' + ' / "data"',
        "see ../" + _NAME + "/DESIGN.md",
        "images from imagenet" + "-sample",
    ]
    assert [len(mentions(s)) for s in spellings] == [1, 1, 1]
    assert mentions("a cache shared by every job") == []
