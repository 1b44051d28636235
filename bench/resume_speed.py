"""Mid-epoch resume in O(1): how long a resumed epoch takes to deliver its first new batch, against a
fresh epoch's first batch, at 10%, 50% and 90% of the epoch (issue 21).

Phase 2 draws batches from windows of the rank's copy stream (``pipeline.views.deal``): a resume replays only
the window its step lies in and reads nothing before it, so its start-up should cost about what a fresh
start's costs, wherever it stopped. The old way, replaying every trained step and throwing it away, is
measured too (the time to draw the first ``s`` batches of a fresh epoch). ImageNet-shaped synthetic
JPEGs (500x375, ``bench/scale.py``'s generator), DeiT's recipe at 224 px with R = 3, one loader worker,
the data path alone (no student), one process. Conditions and figures are written to
``bench/results/resume.json``.

    .venv/bin/python bench/resume_speed.py [--count 2048] [--batch-size 64] [--window 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import RESULTS, write_result  # noqa: E402
from bench.scale import make_photos  # noqa: E402
from pipeline.phase2.lanes import StreamSpec, epoch_batches  # noqa: E402
from pipeline.shards.lists import load_shard_list  # noqa: E402
from pipeline.shards.pack import pack  # noqa: E402
from pipeline.views import deal as dl  # noqa: E402
from pipeline.views.plans import epoch_plan  # noqa: E402
from pipeline.views.recipe import make_recipe  # noqa: E402


def first_batch_s(spec_args: dict, batch: int, window: int, step: int, draws: int = 1) -> float:
    """Seconds until ``draws`` batches starting at ``step`` have been delivered (a fresh loader)."""
    t0 = time.perf_counter()
    batches = iter(epoch_batches(StreamSpec(**spec_args), batch, window, seed=0, first_step=step))
    for _ in range(draws):
        next(batches)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2048, help="synthetic photos in the epoch's shards")
    p.add_argument("--per-shard", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--window", type=int, default=512, help="copies per window (--shuffle-buffer)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--out", default=str(RESULTS / "resume.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp) / "photos", args.count)
        meta = pack(str(Path(tmp) / "photos"), str(Path(tmp) / "shards"), per_shard=args.per_shard)["train"]
        shards = load_shard_list(str(Path(tmp) / "shards" / meta["pattern"]))
        recipe = make_recipe("deit", img_size=args.img_size, repeats=3)
        plan = epoch_plan(0, 3, 300)
        segments = dl.deal(shards, plan, 0, 1).segments(0)
        spec = {"shards": shards, "lanes": [segments], "starts": [], "plan": plan, "recipe": recipe, "seed": 0}
        spec.update(num_classes=1000, pairing=3)
        steps = dl.deal(shards, plan, 0, 1).steps(args.batch_size)
        fresh = first_batch_s(spec, args.batch_size, args.window, 0)
        rows = [{"position": "fresh start", "step": 0, "seconds": round(fresh, 3), "ratio": 1.0}]
        for frac in (0.1, 0.5, 0.9):
            step = int(frac * steps)
            resumed = first_batch_s(spec, args.batch_size, args.window, step)
            replayed = first_batch_s(spec, args.batch_size, args.window, 0, draws=step + 1)
            rows.append(
                {
                    "position": f"{int(frac * 100)}% of the epoch",
                    "step": step,
                    "seconds": round(resumed, 3),
                    "ratio": round(resumed / fresh, 3),
                    "replaying_every_step_s": round(replayed, 3),
                    "replaying_ratio": round(replayed / fresh, 3),
                }
            )
            print(rows[-1], flush=True)
    conditions = {
        "images": args.count,
        "copies_per_epoch": 3 * sum(s.size for s in segments),
        "steps": steps,
        "batch_size": args.batch_size,
        "window": args.window,
        "img_size": args.img_size,
        "repeats": 3,
        "workers": 0,
    }
    write_result(args.out, "resume", rows, conditions=conditions)
    print(rows[0])


if __name__ == "__main__":
    main()
