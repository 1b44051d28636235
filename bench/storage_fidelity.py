"""Storage and fidelity of the top-k cache, measured (not claimed).

(a) Storage: the real photos of ``--images DIR`` (e.g. 200 ImageNet JPEGs, 1000 classes) are
packed into 2 shards in a temp dir and cached by ``pipeline.phase1.cache_teacher.run`` with K = 5, 10, 20
(same data, views, recipe; a randomly initialised ``regnety_002`` teacher, 64 px). Reported: bytes
on disk per (sample, view), for the whole zarr group and for the three per-view arrays, next to
dense fp32 logits (``4 * num_classes`` bytes) and the ratio. Random-init logits are nearly
uniform, so the zstd-compressed sizes are those of such logits; the raw (uncompressed) size
``2K + 2K + 4T`` is printed too.

(b) Fidelity: how close the soft target rebuilt from the cache
(``pipeline.models.targets.soft_target_probs`` on ``pipeline.models.targets.topk_targets`` output: fp16 top-k
values, indices, fp32 logsumexp per temperature, exactly what cache-teacher stores) is to the
teacher's full softmax at tau, per K and tau in {1, 3}: mean KL(full || rebuilt) in nats,
mean total-variation distance, top-1 agreement (argmax of the rebuilt target vs the teacher's),
and the mean probability mass outside the top K. Two teachers, labelled in the table:

* ``digits (trained)``: a ``regnety_002`` trained here with ``pipeline.phase2.train`` on scikit-learn's
  digits (10 classes; demo teacher settings, ``--teacher-epochs`` epochs), or the checkpoint given
  with ``--teacher-checkpoint``; logits on the DeiT-recipe views of the digits shards. K = 1, 2, 5, 10.
* ``synthetic-1000``: NOT a network. 1000-class logits drawn from a peaked distribution (one
  dominant class, a few related classes, Gaussian background; see ``synthetic_logits``) as a
  stand-in for an ImageNet teacher. K = 1, 5, 10, 20. Its top-1 probability and entropy are
  printed so the reader can judge how realistic it is.

    .venv/bin/python bench/storage_fidelity.py --images DIR [--teacher-epochs 3] [--teacher-checkpoint FILE]
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

from bench import report  # noqa: E402
from bench.common import IMAGENET_CLASSES, RESULTS, add_images_argument, photo_folder_setup, write_result  # noqa: E402
from pipeline.models.targets import soft_target_probs, topk_targets  # noqa: E402

TEMPS = [1.0, 3.0]


# -- (a) storage ---------------------------------------------------------------------------------
def storage(tmp: Path, args: argparse.Namespace) -> list[dict]:
    from pipeline.cache import open_cache
    from pipeline.phase1.cache_teacher import CacheConfig, run

    _, shards, teacher = photo_folder_setup(tmp / "inet", 100, "regnety_002", args.images)
    num_classes = IMAGENET_CLASSES
    rows = []
    for k in args.storage_k:
        out = tmp / f"cache-k{k}.zarr"
        t0 = time.perf_counter()
        summary = run(
            CacheConfig(
                shards=shards,
                out=str(out),
                teacher="regnety_002",
                teacher_checkpoint=teacher,
                num_classes=num_classes,
                recipe=args.storage_recipe,
                img_size=args.img_size,
                views=args.views,
                view_block=args.views,
                topk=k,
                temperatures=TEMPS,
                batch_size=64,
                workers=0,
                progress="off",
            )
        )
        wall = time.perf_counter() - t0
        cache = open_cache(str(out))
        sample_views = int(cache.done_counts().sum()) * args.views
        total = cache.nbytes_stored()
        per_view = sum(_dir_bytes(out / name) for name in ("values", "indices", "logsumexp"))
        dense = 4 * num_classes
        raw = 2 * k + 2 * k + 4 * len(TEMPS)
        rows.append(
            {
                "K": k,
                "num_classes": num_classes,
                "sample_views": sample_views,
                "bytes_on_disk": total,
                "bytes_per_sample_view": total / sample_views,
                "arrays_bytes_per_sample_view": per_view / sample_views,
                "raw_bytes_per_sample_view": raw,
                "dense_fp32_bytes": dense,
                "ratio_dense_over_disk": dense / (total / sample_views),
                "wall_s": round(wall, 2),
                "units_done": summary["units_done"],
            }
        )
    return rows


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- (b) fidelity --------------------------------------------------------------------------------
def fidelity_rows(logits: torch.Tensor, ks: list[int], source: str) -> list[dict]:
    """Compare the full softmax with the target rebuilt from what the cache stores, per K and tau."""
    logits = logits.float()
    n, c = logits.shape
    rows = []
    for k in ks:
        values, indices, lse = topk_targets(logits, k, TEMPS)  # fp16 values, as cached
        for ti, tau in enumerate(TEMPS):
            p = torch.softmax(logits / tau, dim=-1)
            q = soft_target_probs(values, indices, lse[:, 0], lse[:, ti], TEMPS[0], tau, c)
            logp = torch.log_softmax(logits / tau, dim=-1)
            zero_q = (q <= 0) & (p > 0)
            kl = (p * (logp - torch.log(q.clamp_min(1e-30)))).sum(-1)
            rows.append(
                {
                    "teacher": source,
                    "num_classes": c,
                    "n": n,
                    "K": k,
                    "tau": tau,
                    "kl_mean": float(kl.mean()),
                    "kl_max": float(kl.max()),
                    "tv_mean": float(0.5 * (p - q).abs().sum(-1).mean()),
                    "top1_agree": float((q.argmax(-1) == p.argmax(-1)).float().mean()),
                    "mass_outside_topk": float((1 - p.gather(1, indices.long()).sum(-1)).mean()),
                    "rows_with_zero_q_where_p_positive": int(zero_q.any(-1).sum()),
                    "teacher_top1_prob": float(p.max(-1).values.mean()),
                    "teacher_entropy": float(-(p * logp).sum(-1).mean()),
                }
            )
    return rows


def synthetic_logits(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """Peaked 1000-class logits: Gaussian background, a dominant class, 5 related classes.

    Background ~ N(0, 1.5^2); the dominant class gets +U(4, 12); five other classes (a random
    "neighbourhood") get +U(0.3, 0.8) times that margin. This gives a mean top-1 probability
    around 0.5-0.8 at tau 1, in the range of trained ImageNet classifiers, but it is a model of a
    teacher, not a teacher.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 1.5
    margin = 4 + 8 * torch.rand(n, generator=g)
    top = torch.randint(0, c, (n,), generator=g)
    logits[torch.arange(n), top] += margin
    for _ in range(5):
        other = torch.randint(0, c, (n,), generator=g)
        logits[torch.arange(n), other] += margin * (0.3 + 0.5 * torch.rand(n, generator=g))
    return logits


def digits_logits(tmp: Path, args: argparse.Namespace) -> tuple[torch.Tensor, str]:
    """Logits of a trained digits teacher on DeiT-recipe views of the digits training shards."""
    from pipeline.apps.demo import load_demo_config
    from pipeline.config import from_mapping
    from pipeline.phase1.cache_teacher import CacheConfig, build_teacher
    from pipeline.phase2.train import TrainConfig, train
    from pipeline.shards.decode import iter_decoded
    from pipeline.shards.lists import load_shard_list
    from pipeline.shards.pack import pack
    from pipeline.views.pixels import stack_views as stack
    from pipeline.views.recipe import make_recipe
    from pipeline.views.replay import replay_shard

    cfg = load_demo_config(None, "full")
    meta = pack("digits", str(tmp / "digits"), **cfg["pack"])
    shards = str(tmp / "digits" / meta["train"]["pattern"])
    ckpt = args.teacher_checkpoint
    if ckpt:
        how = f"checkpoint {ckpt}"
    else:
        section = {**cfg["teacher"], "epochs": args.teacher_epochs}
        values = from_mapping(
            TrainConfig,
            {
                **section,
                "shards": shards,
                "out": str(tmp / "teacher"),
                "device": "cpu",
                "workers": 0,
                "progress": "off",
            },
            "teacher",
        )
        res = train(TrainConfig(**values))
        ckpt = str(tmp / "teacher" / "last.pth")
        how = (
            f"trained here: demo teacher settings, {args.teacher_epochs} epochs, "
            f"last train loss {res['train_loss']:.3f}"
        )
    teacher, _ = build_teacher(
        CacheConfig(teacher=cfg["cache"]["teacher"], teacher_checkpoint=ckpt), 10, torch.device("cpu")
    )
    recipe = make_recipe(cfg["cache"]["recipe"])
    out = []
    for i, shard in enumerate(load_shard_list(shards)[: args.digits_shards]):
        views = replay_shard(iter_decoded(shard, i, 10), range(args.views), recipe, 0, shard.name, shard.count)
        px = stack([v.pixels for v in views])
        with torch.inference_mode():
            out.extend(teacher(px[j : j + 256]) for j in range(0, len(px), 256))
    return torch.cat(out).float(), how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage-k", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--storage-recipe", default="deit", choices=["deit", "eval"])
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--teacher-checkpoint", default=None, help="a digits regnety_002 checkpoint (skips training)")
    ap.add_argument("--digits-shards", type=int, default=2, help="digits shards (300 samples each) to score")
    ap.add_argument("--synthetic-n", type=int, default=2000)
    add_images_argument(ap)
    ap.add_argument("--out", default=str(RESULTS / "storage_fidelity.json"))
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    with tempfile.TemporaryDirectory(prefix="stillroom-bench-") as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        st = storage(tmp, args)
        t_storage = time.perf_counter() - t0
        dl, how = digits_logits(tmp, args)
    fid = fidelity_rows(dl, [1, 2, 5, 10], "digits (trained)")
    fid += fidelity_rows(synthetic_logits(args.synthetic_n, 1000), [1, 5, 10, 20], "synthetic-1000 (not a network)")

    doc = write_result(
        args.out,
        "storage_fidelity",
        {"storage": st, "fidelity": fid},
        digits_teacher=how,
        storage_wall_s=round(t_storage, 2),
        settings={"img_size": args.img_size, "recipe": args.storage_recipe, "temperatures": TEMPS},
        note=args.note,
    )
    print("\n".join(report.storage_fidelity(doc)))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
