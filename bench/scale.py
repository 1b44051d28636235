"""How cost grows with the data: ImageNet-shaped data at N = 2k, 8k, 32k images, both phases.

Makes synthetic ImageNet-shaped JPEGs (1000 classes, 500x375 at quality 90, photo-like texture: a
pool of generated photos, each sample a shifted, flipped copy re-encoded, so every file differs), then
for each N, side by side in one run:

* ``stillroom pack`` of an ImageFolder tree of N images (1000 per shard);
* start-up reads: bytes read from the shards to learn their counts with the pack index (none) and
  by a header-only scan (no index), per shard;
* ``stillroom cache-teacher`` over all N (``regnety_002``, 224 px, DeiT recipe, ``--views``, random
  weights: a real forward's cost), in a subprocess: start-up seconds before the first teacher batch,
  img·views/s, peak RSS of the main process and of one loader worker, cache bytes per (sample, view);
* ``stillroom train-student`` (``deit_tiny_distilled_patch16_224``, cached hard distillation,
  ``--steps`` steps): start-up seconds before the first step, img/s, peak RSS of main and worker;

and, with no compute, ImageNet's cache geometry (1,281 shards x 300 views in blocks of 10: 38,430
units): seconds to create the empty cache, to run ``cache-status`` on it, and for a phase-2 start-up to
refuse it (it is empty), and the bytes of its metadata.

    .venv/bin/python bench/scale.py [--sizes 2000 8000 32000] [--views 1] [--steps 20] [--workers 2]

Per-sample cost and memory should stay flat as N grows 16x; the printed table says where they do not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import RESULTS, md_table, write_result  # noqa: E402

TEACHER, STUDENT, CLASSES, POOL = "regnety_002", "deit_tiny_distilled_patch16_224", 1000, 64
STILLROOM = str(Path(sys.executable).with_name("stillroom"))


# -- data --------------------------------------------------------------------------------------
def _base_photo(seed: int) -> np.ndarray:
    """A 500x375 photo-like image: gradients, shapes and grain (see tests/photos.py for the idea)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    img = np.stack(
        [rng.uniform(30, 220) + rng.uniform(-0.3, 0.3) * xx + rng.uniform(-0.3, 0.3) * yy for _ in range(3)], -1
    )
    for _ in range(12):
        y0, x0 = int(rng.integers(0, 300)), int(rng.integers(0, 400))
        img[y0 : y0 + int(rng.integers(20, 150)), x0 : x0 + int(rng.integers(20, 200))] = rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def _write_range(folder: str, start: int, stop: int) -> None:
    pool = [_base_photo(s) for s in range(POOL)]
    for i in range(start, stop):
        arr = np.roll(pool[i % POOL], shift=(i * 7) % 500, axis=1)
        img = Image.fromarray(arr[:, ::-1] if i % 2 else arr)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        cls = Path(folder) / f"n{i % CLASSES:08d}"
        cls.mkdir(exist_ok=True)
        (cls / f"img{i:07d}.JPEG").write_bytes(buf.getvalue())


def make_photos(folder: Path, n: int, jobs: int = 2) -> float:
    """``n`` JPEGs in ``folder/<class>/``; returns their mean size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-n // jobs)
    with ProcessPoolExecutor(jobs) as ex:
        list(
            ex.map(_write_range, [str(folder)] * jobs, range(0, n, step), [min(n, s + step) for s in range(0, n, step)])
        )
    sizes = [p.stat().st_size for p in folder.rglob("*.JPEG")]
    return float(np.mean(sizes))


def subset(photos: Path, n: int, out: Path) -> Path:
    """An ImageFolder of the first ``n`` photos, as symbolic links."""
    for i in range(n):
        src = photos / f"n{i % CLASSES:08d}" / f"img{i:07d}.JPEG"
        dst = out / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
    return out


# -- measuring processes -------------------------------------------------------------------------
class PeakRss:
    """Polls /proc every 0.2 s: the peak resident set of a process and of its descendants (VmRSS), and
    their peak anonymous memory (RssAnon: heap and tensors, without the mapped library files that every
    process shares; a forked worker's count includes pages it still shares with its parent)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.children_peak = pid, 0, 0
        self.anon, self.children_anon = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss(pid: int) -> tuple[int, int]:
        """(VmRSS, RssAnon) in bytes."""
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = {
                    line.split(":")[0]: int(line.split()[1]) * 1024
                    for line in f
                    if line.startswith(("VmRSS", "RssAnon"))
                }
        except OSError:
            return 0, 0
        return fields.get("VmRSS", 0), fields.get("RssAnon", 0)

    @staticmethod
    def _children(pid: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # the task ended meanwhile
                out += [int(c) for c in task.read_text().split()]
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, anon = self._rss(self.pid)
            self.peak, self.anon = max(self.peak, rss), max(self.anon, anon)
            pending = self._children(self.pid)
            while pending:
                c = pending.pop()
                rss, anon = self._rss(c)
                self.children_peak, self.children_anon = max(self.children_peak, rss), max(self.children_anon, anon)
                pending += self._children(c)
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_timed(cmd: list[str], first_line: str) -> dict[str, Any]:
    """Run ``cmd``; seconds until a log line matching ``first_line``, wall time, peak RSS, stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "STILLROOM_PROGRESS_INTERVAL": "0", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = PeakRss(p.pid)
    first = None
    lines = []
    assert p.stderr is not None
    for line in p.stderr:
        lines.append(line)
        if first is None and re.search(first_line, line):
            first = time.monotonic() - t0
    out = p.stdout.read() if p.stdout else ""
    rc = p.wait()
    rss.stop()
    if rc != 0:
        raise RuntimeError(f"{cmd[1]} failed ({rc}):\n{''.join(lines[-20:])}")
    return {
        "startup_s": first,
        "wall_s": time.monotonic() - t0,
        "peak_rss_main_mb": rss.peak / 2**20,
        "peak_rss_worker_mb": rss.children_peak / 2**20,
        "peak_private_main_mb": rss.anon / 2**20,
        "peak_private_worker_mb": rss.children_anon / 2**20,
        "stdout": out,
        "log": lines,
    }


# -- the steps -----------------------------------------------------------------------------------
def _bytes_read() -> int:
    """Bytes this process has read from files so far (``rchar`` of /proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def startup_bytes(data: Path, pattern: str) -> dict[str, float]:
    """Bytes read to learn a shard list's counts: with the pack index (the sidecar), and without any
    index (a header-only scan), per shard, measured by the process's own read counter."""
    from pipeline.shards.lists import load_shard_list

    bare = data.parent / f"no-index-{data.name}"
    bare.mkdir(exist_ok=True)
    for tar in data.glob("*.tar"):
        (bare / tar.name).unlink(missing_ok=True)
        (bare / tar.name).symlink_to(tar)
    out = {}
    for name, spec in (("index", str(data / pattern)), ("header_scan", str(bare / pattern))):
        before, t0 = _bytes_read(), time.perf_counter()
        shards = load_shard_list(spec)
        out[f"{name}_bytes_per_shard"] = (_bytes_read() - before) / len(shards)
        out[f"{name}_s"] = time.perf_counter() - t0
    out["shard_bytes"] = sum(t.stat().st_size for t in data.glob("*.tar")) / len(shards)
    return out


def phase1(shards: str, checkpoint: str, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        STILLROOM,
        "cache-teacher",
        "--shards",
        shards,
        "--out",
        str(cache),
        "--teacher",
        TEACHER,
        "--num-classes",
        "1000",
    ]
    cmd += ["--teacher-checkpoint", checkpoint, "--recipe", "deit", "--img-size", "224", "--views", str(args.views)]
    cmd += ["--view-block", str(args.views), "--topk", "10", "--batch-size", "64", "--workers", str(args.workers)]
    cmd += ["--repeats", str(args.repeats)]
    r = run_timed([*cmd, "--progress", "log"], r"cache-teacher: [\d,]+/")
    m = re.search(r"(\d+) views", r["stdout"])
    views = int(m.group(1)) if m else 0
    r["img_views_per_s"] = views / max(r["wall_s"] - (r["startup_s"] or 0), 1e-9)
    from pipeline.inspection.status import status

    r["cache_bytes_per_sample_view"] = status(str(cache))["bytes_per_sample_view"]
    return r


def phase2(shards: str, cache: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [STILLROOM, "train-student", "--shards", shards, "--cache", str(cache), "--model", STUDENT]
    cmd += ["--epochs", "1", "--max-steps-per-epoch", str(args.steps), "--batch-size", "32", "--out", str(out)]
    cmd += ["--workers", str(args.workers), "--log-every", "1", "--warmup-epochs", "0", "--progress", "log"]
    cmd += ["--repeats", str(args.repeats)]
    r = run_timed(cmd, r"epoch 0 \(views [\d,]+\): [\d,]+/")
    import json

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [s for s in steps if s["event"] == "train"]
    r["img_per_s"] = 32 * (len(train) - 1) / max(train[-1]["time"] - train[0]["time"], 1e-9) if len(train) > 1 else None
    return r


def empty_imagenet_cache(tmp: Path) -> dict[str, Any]:
    """ImageNet's geometry with no data: creating it, cache-status on it, a phase-2 start-up refusing it."""
    from pipeline.cache import CacheMeta, create_or_open
    from pipeline.errors import CacheError
    from pipeline.inspection.status import status
    from pipeline.phase2.train import train
    from pipeline.shards.lists import ShardInfo
    from pipeline.train_options import TrainConfig
    from pipeline.views.recipe import make_recipe

    folder = tmp / "imagenet-shards"
    folder.mkdir()
    shards = []
    for i in range(1281):
        (folder / f"train-{i:06d}.tar").touch()
        shards.append(ShardInfo(str(folder / f"train-{i:06d}.tar"), 1000))
    meta = CacheMeta.build(
        shards=shards,
        num_classes=1000,
        capacity=1000,
        topk=10,
        temperatures=(1.0, 3.0),
        views=300,
        view_block=10,
        seed=0,
        recipe=make_recipe("deit", repeats=3).to_dict(),
        teacher={"name": "regnety_160", "checkpoint_sha256": "0" * 64, "input_size": 224},
    )
    url = str(tmp / "imagenet.zarr")
    t0 = time.perf_counter()
    create_or_open(url, meta)
    created = time.perf_counter() - t0
    t0 = time.perf_counter()
    st = status(url)
    status_s = time.perf_counter() - t0
    cfg = TrainConfig(shards=[str(folder / "train-{000000..001280}.tar")], cache=[url], out=str(tmp / "refused"))
    t0 = time.perf_counter()
    try:
        train(cfg)
        refused = None
    except CacheError as e:
        refused = str(e)[:120]
    startup = time.perf_counter() - t0
    return {
        "units": st["units_total"],
        "create_s": created,
        "status_s": status_s,
        "phase2_startup_s": startup,
        "phase2_message": refused,
        "metadata_bytes": st["bytes_on_disk"],
    }


def rebatch_ms(batch: int = 128, buffer: int = 2048, views: int = 8192) -> dict[str, float]:
    """The main process's cost of drawing one batch from a window of the epoch, 224 px float16 views."""
    import torch

    from pipeline.phase2.lanes import StreamSpec, WindowBatches
    from pipeline.views import deal as dl
    from pipeline.views.plans import epoch_plan
    from pipeline.views.recipe import make_recipe

    def chunk(first: int, n: int) -> dict[str, Any]:
        return {
            "lane": 0,
            "first": first,
            "stop": first + n,
            "skipped": [],
            "copy": torch.arange(first, first + n),
            "pixels": torch.zeros(n, 3, 224, 224, dtype=torch.float16),
            "label": torch.zeros(n, dtype=torch.long),
            "mix_label": torch.zeros(n, dtype=torch.long),
            "lam": torch.ones(n),
            "views": torch.zeros(n, dtype=torch.long),
            "keys": [f"k{first + i}" for i in range(n)],
        }

    out = {}
    for window in (batch * 2, buffer):
        total = window + views
        spec = StreamSpec([], [[dl.Segment(0, 0, total)]], [0], epoch_plan(0, 1, 1), make_recipe("deit"), 0, 10)
        chunks = (chunk(a, min(dl.CHUNK, total - a)) for a in range(0, total, dl.CHUNK))
        draws = iter(WindowBatches(chunks, spec, window, batch, seed=0, first_step=0))
        times = []
        for _ in range(views // batch):
            t0 = time.perf_counter()
            next(draws)
            times.append(time.perf_counter() - t0)
        out[f"buffer_{window}_ms_per_batch"] = 1e3 * float(np.median(times))
    return out


def one_size(n: int, photos: Path, checkpoint: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.shards.pack import pack

    folder = subset(photos, n, tmp / f"photos-{n}")
    data = tmp / f"data-{n}"
    t0 = time.perf_counter()
    meta = pack(str(folder), str(data), per_shard=1000)["train"]
    row: dict[str, Any] = {"n": n, "shards": len(meta["shards"]), "pack_s": time.perf_counter() - t0}
    row.update(startup_bytes(data, meta["pattern"]))
    shards = str(data / meta["pattern"])
    p1 = phase1(shards, checkpoint, tmp / f"cache-{n}.zarr", args)
    p2 = phase2(shards, tmp / f"cache-{n}.zarr", tmp / f"run-{n}", args)
    for name, r in (("phase1", p1), ("phase2", p2)):
        row[name] = {k: v for k, v in r.items() if k not in ("stdout", "log")}
    return row


def table(rows: list[dict[str, Any]], empty: dict[str, Any]) -> str:
    head = ["N", "shards", "pack s", "start-up bytes/shard (index, header scan, whole shard)"]
    head += ["phase 1 start-up s", "img·views/s", "RSS main / worker MB (anonymous)", "cache B/(sample, view)"]
    head += ["phase 2 start-up s", "img/s", "RSS main / worker MB (anonymous)"]
    body = []
    for r in rows:
        p1, p2 = r["phase1"], r["phase2"]
        body.append(
            [
                r["n"],
                r["shards"],
                r["pack_s"],
                f"{r['index_bytes_per_shard']:.0f} / {r['header_scan_bytes_per_shard']:,.0f} / {r['shard_bytes']:,.0f}",
                p1["startup_s"],
                p1["img_views_per_s"],
                f"{p1['peak_rss_main_mb']:.0f} / {p1['peak_rss_worker_mb']:.0f} "
                f"({p1.get('peak_private_main_mb', 0):.0f} / {p1.get('peak_private_worker_mb', 0):.0f})",
                p1["cache_bytes_per_sample_view"],
                p2["startup_s"],
                p2["img_per_s"],
                f"{p2['peak_rss_main_mb']:.0f} / {p2['peak_rss_worker_mb']:.0f} "
                f"({p2.get('peak_private_main_mb', 0):.0f} / {p2.get('peak_private_worker_mb', 0):.0f})",
            ]
        )
    extra = (
        f"\n\nImageNet geometry, no data ({empty['units']:,} units): create {empty['create_s']:.2f} s, "
        f"cache-status {empty['status_s']:.2f} s, phase-2 start-up to its refusal {empty['phase2_startup_s']:.2f} s, "
        f"metadata {empty['metadata_bytes']:,} bytes."
    )
    return md_table(head, body) + extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--views", type=int, default=1, help="views per sample cached in phase 1")
    ap.add_argument("--steps", type=int, default=20, help="phase-2 steps of batch 32")
    ap.add_argument("--workers", type=int, default=2, help="loader workers in both phases")
    ap.add_argument("--repeats", type=int, default=1, help="repeated augmentation R (--views must be a multiple)")
    ap.add_argument("--tmp", default=None, help="work folder (needs ~2 x 110 KB x the largest N); default a temp dir")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stillroom-scale-", dir=args.tmp) as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        jpeg_bytes = make_photos(tmp / "photos", max(args.sizes))
        made_s = time.perf_counter() - t0
        checkpoint = str(tmp / f"{TEACHER}.pth")
        import timm
        import torch

        torch.manual_seed(0)
        torch.save(timm.create_model(TEACHER, num_classes=CLASSES).state_dict(), checkpoint)
        rows = [one_size(n, tmp / "photos", checkpoint, tmp, args) for n in args.sizes]
        empty = empty_imagenet_cache(tmp)
        rebatch = rebatch_ms()
    text = table(rows, empty) + (
        f"\n\nRe-batching in the main process, batch 128 of 224 px float16 views: "
        f"{rebatch['buffer_256_ms_per_batch']:.1f} ms with 256 views held, "
        f"{rebatch['buffer_2048_ms_per_batch']:.1f} ms with 2048."
    )
    print(text)
    write_result(
        args.out,
        "scale",
        {"sizes": rows, "imagenet_geometry": empty, "rebatch": rebatch, "repeats": args.repeats, "views": args.views},
        mean_jpeg_bytes=jpeg_bytes,
        make_photos_s=made_s,
        note=args.note,
        table=text,
    )


if __name__ == "__main__":
    main()
