"""Helpers shared by the bench scripts: machine description, command line, JSON, markdown tables.

API (import as ``from bench.common import ...`` after putting the repo root on ``sys.path``, or
``from common import ...`` when run as ``python bench/x.py``):

* ``machine() -> dict``: CPU model (lscpu ``Model name``), logical/usable cores, torch threads,
  GPU name if any, Python/torch/torchvision/timm/zarr/numpy versions, OS.
* ``command() -> str``: the exact command line of this process, shell-quoted and relative to
  the repo root (``.venv/bin/python bench/x.py --flag 1``).
* ``write_result(path, name, results, **extra) -> dict``: writes
  ``{"benchmark", "date", "command", "machine", "results", **extra}`` as JSON (atomic rename)
  and returns it. Every bench JSON has these keys; ``bench/report.py`` relies on them.
* ``md_table(headers, rows) -> str``: a GitHub markdown table; floats get ``fmt_num``.
* ``fmt_num(x, digits=4) -> str``: compact formatting (``-`` for ``None``).
* ``RESULTS``: ``bench/results`` (Path).
* ``add_images_argument(parser)``: the ``--images DIR`` argument of benchmarks that need real photos
  (a folder ``stillroom pack`` accepts: an ImageFolder tree, or flat files with ``classes.tsv``).
* ``photo_folder_setup(folder, per_shard, teacher, images) -> (meta, shards, checkpoint)``: packs
  ``images`` into shards under ``folder`` and saves a randomly initialised teacher (seed 0).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMAGENET_CLASSES = 1000  # the teacher head of the speed and storage benchmarks


def _photo_folder(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a folder of photos (an ImageFolder tree, or images with a classes.tsv)"
        )
    return path


def add_images_argument(parser: argparse.ArgumentParser) -> None:
    """``--images DIR``: the real photos a benchmark packs (required; no default path exists)."""
    parser.add_argument(
        "--images",
        type=_photo_folder,
        required=True,
        help="folder of real photos to pack: ImageFolder tree (<class>/<image>) or flat files with classes.tsv",
    )


def photo_folder_setup(folder: Path, per_shard: int, teacher: str, images: Path) -> tuple[dict[str, Any], str, str]:
    """Shards of the photos in ``images`` plus a random-init ``teacher`` checkpoint with ImageNet's head.

    No pretrained weights can be downloaded here; random weights cost the same per forward, which is
    what the speed and storage benchmarks measure. The head has ``IMAGENET_CLASSES`` outputs whatever
    the folder holds (top-k, logsumexp and storage then cost what they cost on ImageNet); a folder
    with more classes is refused. Returns the pack sidecar's ``train`` entry, the shard pattern and
    the checkpoint path.
    """
    import timm
    import torch

    from pipeline.shards.pack import pack

    meta = pack(str(images), str(folder / "data"), per_shard=per_shard)["train"]
    if meta["num_classes"] > IMAGENET_CLASSES:
        raise SystemExit(f"{images}: {meta['num_classes']} classes, more than the {IMAGENET_CLASSES} benchmarks use")
    torch.manual_seed(0)
    checkpoint = folder / f"{teacher}-random.pth"
    torch.save(timm.create_model(teacher, num_classes=IMAGENET_CLASSES).state_dict(), checkpoint)
    return meta, str(folder / "data" / meta["pattern"]), str(checkpoint)


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu": _lscpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    for mod in ("torch", "torchvision", "timm", "zarr", "numpy"):
        with contextlib.suppress(Exception):  # a missing library is just not reported
            info[mod] = __import__(mod).__version__
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    return info


def command() -> str:
    """This process's command line, relative to the repo root where possible."""
    exe = sys.executable
    if Path(exe).is_relative_to(ROOT):
        exe = os.path.relpath(exe, ROOT)
    argv = list(sys.argv)
    if argv and os.path.isabs(argv[0]) and Path(argv[0]).is_relative_to(ROOT):
        argv[0] = os.path.relpath(argv[0], ROOT)
    return shlex.join([exe, *argv])


def write_result(path: str | Path, name: str, results: Any, **extra: Any) -> dict[str, Any]:
    """Write one benchmark's JSON with date, command and machine; return the document."""
    doc = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command(),
        "machine": machine(),
        "results": results,
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return doc


def fmt_num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) < 10 ** -(digits - 1):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}"
    return str(x)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(fmt_num(c) for c in r) + " |")
    return "\n".join(lines)
