"""Storage codecs for the teacher cache's arrays: bytes on disk, encode and decode time, bit-flip detection.

THE DATA ARE SYNTHETIC. No pretrained teacher exists on the machine this was written on, so the
arrays are made from a model of an ImageNet teacher's logits (``SyntheticTeacher``), not from a
network; sizes depend on that model (see its docstring for what it does and does not capture).
What is real: the reduction (``pipeline.models.build.topk_targets``: fp16 values, int64 indices stored as
int16, fp32 logsumexp at tau 1 and 3), the array shapes, chunking and dtypes of
``docs/cache-format.md`` (one chunk ``[B, cap, K]`` per unit, C order), and zarr v3 itself: every
configuration is written through a real zarr array on a ``LocalStore`` in a temp dir, and bytes are
the chunk files' sizes, so zarr's own per-chunk overhead is included in every figure.

Per-view arrays (``values``, ``indices``, ``logsumexp``), for K in ``--k`` and B in ``--blocks``:

* ``zstd-L``: ``ZstdCodec(level=L, checksum=True)``; ``today`` is the cache's codec (level 0, i.e.
  zstd's default 3: ``zstd-3`` is the same codec, so their difference shows the timing noise);
* ``shuf+zstd-L``: the byte shuffle of ``zarr.codecs.numcodecs.Shuffle`` then zstd with checksum (a
  ``numcodecs.*`` codec, i.e. not in the zarr v3 spec: other zarr implementations may not read it);
* ``blosc-<cname><clevel>-<no|byte|bit>``: ``BloscCodec`` (cname zstd or lz4, clevel 3/5/7/9,
  noshuffle/shuffle/bitshuffle) with the array's itemsize as typesize; ``+crc`` adds
  ``Crc32cCodec()`` after it (blosc carries no checksum of its own);
* layout prefix ``Tv:``: a ``TransposeCodec(order=(1, 0, 2))`` filter first, so a chunk is stored
  ``[cap, B, K]`` (a sample's views together) instead of ``[B, cap, K]``; ``Tr:``:
  ``TransposeCodec(order=(1, 2, 0))``, stored ``[cap, K, B]`` (a sample's rank-k entry over its
  views together). Without a prefix: C order ``[B, cap, K]``, as today.

Timings: ``--units`` units (shards) per array, each written then read back once per round, over
``--rounds`` rounds; all configurations are visited in every round, in a new random order each
round, so a burst of load from other processes hits them alike. Encode is ``array[unit] = data``,
decode is ``array[unit]`` (whole chunk: phase 2's ``Cache.read_view`` decodes the whole block of the
view it needs). Medians over rounds x units. ``dec_ms/128`` = decode per unit x 128 / cap: what one
batch of 128 rows costs when phase 2 trains one view of the block per read (the worst case; if all B
views of a block are trained from one read it is B times less). Bit flips: in unit 0's chunk file of
each configuration, single bits at ``--flips`` evenly spread positions are flipped (one at a time) and
the chunk is read: ``error`` (decode raises), ``silent`` (decodes to other numbers) or ``same``.

Every configuration is measured at the main K and B (the first of ``--blocks``, K=10); the other
K and B get ``MAIN_CANDIDATES`` plus every configuration a choice (below) picked.

Per-shard arrays (``labels`` int32, ``keys`` str, ``digests`` uint64 random 63-bit): bytes per row
for each codec, for rows in shuffled order and in class order, amortised over V views.

Choices (``choose``), at K=10, B=10, one configuration per array, among the spec's codecs (zstd,
blosc, crc32c, transpose) with no silent bit flip, a transpose only where it saves >= ``--min-gain``
bytes: the lowest total decode median with <= ``--target`` bytes per (sample, view) for the three
arrays; the smallest; the smallest whose decode medians (through zarr and codec-only) are at most
``1 + --tolerance`` times today's; the same with at most twice today's encode time. The
recommendation is the first if anything reaches the target, else the third; its decode time is
compared with ``today`` round by round (paired ratios) at every K and B.

Codec-only decode (``codec-only ms``): the same chunk file decoded in memory by the libraries zarr's
codecs call (numcodecs zstd / c-blosc, google-crc32c, a numpy transpose copy), without zarr: the part
that differs between configurations, far less disturbed by other processes than a read through
zarr's async pipeline (about 3/4 of a unit's read here is zarr's overhead and the file read, much
the same for every codec).

    .venv/bin/python bench/codecs.py [--quick] [--rounds 7] [--out bench/results/codecs.json]

Figures in ``bench/results/codecs.json`` (``--rounds 9``; Intel(R) Xeon(R) Processor, 2 cores shared
with a pytest run and another benchmark, load average 4-7; zarr 3.1.6, numcodecs 0.16.6 with
c-blosc 1.21.7; SYNTHETIC logits, bf16 teacher output, DeiT mixing), K=10, B=10, cap=1000, bytes
per (sample, view) for values + indices + logsumexp:

* today (zstd level 0 = 3, checksum): 10.88 + 14.34 + 6.91 = 32.1 B (raw 48 B);
* nothing reaches 25 B: the smallest chain with corruption detection is 26.7 B (values
  ``BloscCodec(zstd, clevel 7, shuffle)``, indices and logsumexp ``BloscCodec(zstd, clevel 9,
  bitshuffle)``, each followed by ``Crc32cCodec()``); zstd alone at level 19 gives 30.7 B;
  transposing the chunk (``Tv:``, ``Tr:``) changes the blosc chains' sizes by less than 0.1 B;
* decode through zarr: 2.72 ms per unit vs today's 2.74 (0.99x; today's codec measured again as
  ``zstd-3`` reads at 0.99x, and per-round ratios of that same codec spread 0.16-2.8x under the
  load), codec-only 0.51 vs 0.75 ms (0.68x); encode 102 ms per unit vs 8 ms (c-blosc's clevel 7
  and 9 are zstd levels 13 and 22; 51-55 ms in two earlier, less loaded runs);
* blosc alone lets 89% of flipped bits decode silently into other numbers (4597 of 5184 flips: 24
  per chunk, 72 configurations x 3 arrays); with ``Crc32cCodec()`` after it, or with zstd's
  checksum, every flip fails to decode; the crc costs 0.03 ms per unit codec-only (0.12 ms through
  zarr, within the noise);
* labels + keys + digests add 1.5 B per (sample, view) at V = 10 and 0.05 B at V = 300 (digests,
  random, are 7.9 of the 15.4 bytes per row).

Other teacher models, same script (``--k 10 --blocks 10 --rounds 1 --units 2``: bytes only),
smallest detectable chain vs today: fp32 logits (``--logit-dtype fp32``: cache-teacher on CPU)
30.4 vs 36.6 B; no mixing (``--mix-prob 0``) 25.7 vs 31.8 B (indices ``Tr:zstd-19``: the one case
where a transpose pays, 1.1 B); stronger class groups (``--group-boost 0.6``) 26.2 vs 31.8 B; rows
in class order (``--order class``) 26.7 vs 32.0 B.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import google_crc32c  # noqa: E402
import numcodecs  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402
from numcodecs import blosc as numcodecs_blosc  # noqa: E402
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec, ZstdCodec  # noqa: E402
from zarr.codecs.numcodecs import Shuffle  # noqa: E402
from zarr.storage import LocalStore  # noqa: E402

from bench.common import RESULTS, fmt_num, md_table, write_result  # noqa: E402
from pipeline.cache import UnitData, unit_checksum  # noqa: E402
from pipeline.models.targets import topk_targets  # noqa: E402

warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

TEMPS = [1.0, 3.0]
NUM_CLASSES = 1000
PER_VIEW = ("values", "indices", "logsumexp")
PER_SHARD = ("labels", "keys", "digests")
_ZSTD = numcodecs.Zstd()
FILL = {"values": 0, "indices": -1, "logsumexp": 0, "labels": -1, "keys": "", "digests": 0}


# -- synthetic teacher --------------------------------------------------------------------------
class SyntheticTeacher:
    """A model of an ImageNet teacher's logits with the structure that matters for compression. NOT a network.

    * Classes: 1000, in contiguous groups of related classes (sizes log-normal, median 10, capped at
      130, like WordNet order's runs: the 118 dog breeds are ids 151-268). Each class has 12 fixed
      "neighbour" classes (up to 8 from its group, the rest anywhere) with fixed weights
      U(0.2, 0.7), and a fixed logit bias N(0, 0.3).
    * Sample: label uniform; the teacher's dominant class is the label (85%) or one of its three
      strongest neighbours (a teacher error). Margin U(8, 18) (15% "hard" samples: U(3, 8)); the
      dominant class gets the margin, its neighbours margin x weight x U(0.7, 1.2), every class of
      its group (the dominant included) margin x U(0.05, 0.2); background N(0, 1.5^2) (as
      ``bench/storage_fidelity.synthetic_logits``).
    * View (augmentation): the sample's signal is scaled by U(0.6, 1.1) (10% of views crop the object
      out: 0.25); the background keeps half its variance from the sample and draws half afresh; a
      per-view offset N(0, 0.5) shifts all logits.
    * Mixing (DeiT: every view, ``--mix-prob`` 1.0): a new random pairing of the shard's samples per
      view; half the pairs CutMix (lam ~ Beta(1, 1)), half Mixup (Beta(0.8, 0.8)); each member's
      logits are ``lam * own + (1 - lam) * partner`` (linear, as a CNN's pooled logits are for CutMix;
      for Mixup it is an approximation), with fresh noise restoring the background's spread.
    * Output dtype: bf16 (``--logit-dtype``; cache-teacher's teacher runs in bf16 autocast on CUDA, so
      its logits carry 8 significant bits) or fp32 (the CPU path).

    Calibrated only so that a clean view (no augmentation, no mixing) has a mean top-1 probability
    near 0.75 at tau 1 (measured: 0.74, top-1 agreement with the label 0.71), roughly a
    well-calibrated ImageNet CNN on clean images; the DeiT views' statistics are reported with the
    results. Not captured: real confusion structure, image-dependent
    calibration, a real teacher's logit scale, the nonlinearity of Mixup.
    """

    NEIGHBOURS = 12

    def __init__(self, num_classes: int = NUM_CLASSES, seed: int = 0, group_boost: float = 0.2):
        rng = np.random.default_rng(seed)
        self.c, self.group_boost = num_classes, group_boost
        sizes: list[int] = []
        while sum(sizes) < num_classes:
            sizes.append(int(np.clip(rng.lognormal(math.log(10), 0.9), 1, 130)))
        sizes[-1] -= sum(sizes) - num_classes
        starts = np.cumsum([0, *sizes[:-1]])
        self.group = np.zeros((num_classes, 2), np.int64)  # [start, stop) of each class's group
        self.neigh = np.zeros((num_classes, self.NEIGHBOURS), np.int64)
        for start, size in zip(starts, sizes, strict=True):
            for c in range(start, start + size):
                self.group[c] = (start, start + size)
                own = [x for x in range(start, start + size) if x != c]
                near = [int(x) for x in rng.permutation(own)[:8]] if own else []
                far = [int(x) for x in rng.permutation(num_classes) if x != c and x not in near]
                self.neigh[c] = (near + far)[: self.NEIGHBOURS]
        self.weight = -np.sort(-rng.uniform(0.2, 0.7, (num_classes, self.NEIGHBOURS)), axis=1)
        self.bias = rng.normal(0, 0.3, num_classes).astype(np.float32)
        self.num_groups = len(sizes)

    def unit(
        self, cap: int, views: int, rng: np.random.Generator, mix_prob: float, order: str, augment: bool = True
    ) -> dict[str, Any]:
        """Logits ``[views, cap, C]`` (float32) of one shard's samples, their labels and mixing weights."""
        c, n = self.c, cap
        rows = np.arange(n)
        labels = rng.integers(0, c, n)
        if order == "class":
            labels = np.sort(labels)
        dom = labels.copy()
        wrong = rng.random(n) < 0.15
        dom[wrong] = self.neigh[labels[wrong], rng.integers(0, 3, int(wrong.sum()))]
        margin = np.where(rng.random(n) < 0.15, rng.uniform(3, 8, n), rng.uniform(8, 18, n)).astype(np.float32)
        signal = np.zeros((n, c), np.float32)
        in_group = (np.arange(c) >= self.group[dom, :1]) & (np.arange(c) < self.group[dom, 1:])
        boost = margin * rng.uniform(self.group_boost / 4, self.group_boost, n)
        signal += in_group * boost[:, None].astype(np.float32)
        signal[rows, dom] += margin
        w = self.weight[dom] * rng.uniform(0.7, 1.2, (n, self.NEIGHBOURS))
        signal[rows[:, None], self.neigh[dom]] += (margin[:, None] * w).astype(np.float32)
        bg = rng.normal(0, 1.5, (n, c)).astype(np.float32)
        out = np.empty((views, n, c), np.float32)
        lams = np.ones((views, n), np.float32)
        for v in range(views):
            if not augment:
                out[v] = self.bias + signal + bg
                continue
            scale = rng.uniform(0.6, 1.1, n).astype(np.float32)
            scale[rng.random(n) < 0.1] = 0.25
            z = self.bias + scale[:, None] * signal + math.sqrt(0.5) * bg
            z += rng.normal(0, 1.5 * math.sqrt(0.5), (n, c)).astype(np.float32)
            z += rng.normal(0, 0.5, (n, 1)).astype(np.float32)
            perm = rng.permutation(n)
            a, b = perm[0 : n - 1 : 2], perm[1:n:2]
            mixed = rng.random(len(a)) < mix_prob
            a, b = a[mixed], b[mixed]
            lam = np.where(rng.random(len(a)) < 0.5, rng.beta(1.0, 1.0, len(a)), rng.beta(0.8, 0.8, len(a)))
            lam = lam.astype(np.float32)[:, None]
            extra = (1.5 * np.sqrt(2 * lam * (1 - lam))).astype(np.float32)
            za, zb = z[a], z[b]
            z[a] = lam * za + (1 - lam) * zb + extra * rng.normal(0, 1, za.shape).astype(np.float32)
            z[b] = lam * zb + (1 - lam) * za + extra * rng.normal(0, 1, zb.shape).astype(np.float32)
            lams[v, a], lams[v, b] = lam[:, 0], lam[:, 0]
            out[v] = z
        return {"logits": out, "labels": labels.astype(np.int32), "lam": lams}


def reduce(logits: np.ndarray, k: int, dtype: str) -> dict[str, np.ndarray]:
    """What cache-teacher stores for a unit's logits: the project's own top-K reduction."""
    views, n, c = logits.shape
    t = torch.from_numpy(logits.reshape(views * n, c))
    if dtype == "bf16":
        t = t.to(torch.bfloat16)
    values, indices, lse = topk_targets(t, k, TEMPS)
    return {
        "values": values.numpy().reshape(views, n, k),
        "indices": indices.numpy().astype(np.int16).reshape(views, n, k),
        "logsumexp": lse.numpy().astype(np.float32).reshape(views, n, len(TEMPS)),
    }


def teacher_stats(logits: np.ndarray, lam: np.ndarray) -> dict[str, float]:
    """How peaked the synthetic teacher is (so a reader can judge it against a real one)."""
    z = torch.from_numpy(logits.reshape(-1, logits.shape[-1]))
    out: dict[str, float] = {}
    for tau in TEMPS:
        p = torch.softmax(z / tau, -1)
        out[f"top1_prob_tau{tau:g}"] = float(p.max(-1).values.mean())
        out[f"top10_mass_tau{tau:g}"] = float(p.topk(10, -1).values.sum(-1).mean())
        out[f"entropy_tau{tau:g}"] = float(-(p * torch.log_softmax(z / tau, -1)).sum(-1).mean())
    out["views_with_lam_in_0.1_0.9"] = float(((lam > 0.1) & (lam < 0.9)).mean())
    return out


# -- codec configurations -----------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One codec chain for one array: optional transpose, then a compressor chain."""

    LAYOUTS: ClassVar[dict[str, tuple[int, int, int]]] = {"Tv": (1, 0, 2), "Tr": (1, 2, 0)}

    kind: str  # "zstd" | "shuf+zstd" | "blosc"
    level: int
    cname: str = ""
    shuffle: str = ""  # blosc: noshuffle | shuffle | bitshuffle
    crc: bool = False
    transpose: str = ""  # "" (C order [B, cap, K]) | "Tv" ([cap, B, K]) | "Tr" ([cap, K, B])
    today: bool = False

    @property
    def name(self) -> str:
        if self.today:
            base = "today (zstd-0)"
        elif self.kind == "blosc":
            short = {"noshuffle": "no", "shuffle": "byte", "bitshuffle": "bit"}[self.shuffle]
            base = f"blosc-{self.cname}{self.level}-{short}" + ("+crc" if self.crc else "")
        else:
            base = f"{self.kind}-{self.level}"
        return f"{self.transpose}:{base}" if self.transpose else base

    @property
    def detects_by_design(self) -> bool:
        return self.kind != "blosc" or self.crc

    def filters(self, ndim: int) -> list[Any]:
        return [TransposeCodec(order=self.LAYOUTS[self.transpose])] if self.transpose and ndim == 3 else []

    def compressors(self, itemsize: int) -> list[Any]:
        if self.kind == "zstd":
            return [ZstdCodec(level=self.level, checksum=True)]
        if self.kind == "shuf+zstd":
            return [Shuffle(elementsize=itemsize), ZstdCodec(level=self.level, checksum=True)]
        chain: list[Any] = [BloscCodec(cname=self.cname, clevel=self.level, shuffle=self.shuffle, typesize=itemsize)]
        return [*chain, Crc32cCodec()] if self.crc else chain

    def code(self, itemsize: int, ndim: int = 3) -> str:
        """The zarr v3 codec objects, as Python source (``filters=[...], compressors=[...]``)."""
        parts = []
        for f in self.filters(ndim):
            parts.append(f"filters=[TransposeCodec(order={tuple(f.order)})]")
        comps = []
        for c in self.compressors(itemsize):
            if isinstance(c, ZstdCodec):
                comps.append(f"ZstdCodec(level={c.level}, checksum={c.checksum})")
            elif isinstance(c, BloscCodec):
                comps.append(
                    f'BloscCodec(cname="{c.cname.value}", clevel={c.clevel}, shuffle="{c.shuffle.value}", '
                    f"typesize={c.typesize})"
                )
            elif isinstance(c, Crc32cCodec):
                comps.append("Crc32cCodec()")
            else:
                comps.append(f"Shuffle(elementsize={itemsize})")
        parts.append(f"compressors=[{', '.join(comps)}]")
        return ", ".join(parts)


def per_view_configs(quick: bool) -> list[Config]:
    out: list[Config] = []
    for transpose in ("", "Tv", "Tr"):
        out.append(Config("zstd", 0, transpose=transpose, today=True))
        for level in (3,) if quick else (1, 3, 9, 19):
            out.append(Config("zstd", level, transpose=transpose))
        for level in (1,) if quick else (1, 3, 9):
            out.append(Config("shuf+zstd", level, transpose=transpose))
        cnames, levels = (("zstd", "lz4"), (5,)) if quick else (("zstd", "lz4"), (3, 5, 7, 9))
        for cname, level, shuffle in itertools.product(cnames, levels, ("noshuffle", "shuffle", "bitshuffle")):
            for crc in (False, True):
                if quick and crc and shuffle != "bitshuffle":
                    continue
                out.append(Config("blosc", level, cname, shuffle, crc, transpose))
    return out


def per_shard_configs(quick: bool) -> list[Config]:
    out = [Config("zstd", 0, today=True)]
    out += [Config("zstd", level) for level in ((3, 19) if quick else (1, 3, 9, 19))]
    out.append(Config("shuf+zstd", 3))
    for cname, level, shuffle in itertools.product(
        ("zstd", "lz4"), (5,) if quick else (5, 9), ("shuffle", "bitshuffle")
    ):
        out.append(Config("blosc", level, cname, shuffle))
    return out


# -- measuring ----------------------------------------------------------------------------------
def _itemsize(a: np.ndarray) -> int:
    return 1 if a.dtype.kind in "OUT" else a.dtype.itemsize


class Trial:
    """One configuration of one array: a zarr v3 array on a LocalStore holding ``len(units)`` unit chunks."""

    def __init__(self, path: Path, config: Config, name: str, units: list[np.ndarray]):
        self.path, self.config, self.name, self.units = path, config, name, units
        first = units[0]
        self.per_view = first.ndim == 3
        self.cap = first.shape[1] if self.per_view else first.shape[0]
        shape = (first.shape[0], self.cap * len(units), first.shape[2]) if self.per_view else (self.cap * len(units),)
        dtype = str if first.dtype.kind in "OUT" else first.dtype
        self.array = zarr.create_array(
            store=LocalStore(path),
            shape=shape,
            chunks=first.shape,
            dtype=dtype,
            fill_value=FILL[name],
            filters=config.filters(first.ndim),
            compressors=config.compressors(_itemsize(first)),
            config={"write_empty_chunks": True},
        )
        self.enc: list[list[float]] = []  # per round: per unit ms
        self.dec: list[list[float]] = []
        self.codec: list[list[float]] = []
        self.nbytes = [0] * len(units)

    def selection(self, u: int) -> tuple[slice, ...]:
        rows = slice(u * self.cap, (u + 1) * self.cap)
        return (slice(None), rows, slice(None)) if self.per_view else (rows,)

    def chunk_file(self, u: int) -> Path:
        return self.path / "c" / "0" / str(u) / "0" if self.per_view else self.path / "c" / str(u)

    def round(self, write: bool) -> None:
        """Write every unit (when ``write``; timed), read it back through zarr, and decode its file in memory."""
        enc, dec, codec = [], [], []
        for u, data in enumerate(self.units):
            sel = self.selection(u)
            if write:
                t0 = time.perf_counter()
                self.array[sel] = data
                enc.append((time.perf_counter() - t0) * 1e3)
            t1 = time.perf_counter()
            back = np.asarray(self.array[sel])
            dec.append((time.perf_counter() - t1) * 1e3)
            if self.per_view:
                raw = self.chunk_file(u).read_bytes()
                t2 = time.perf_counter()
                mem = self.decode_bytes(raw, data)
                codec.append((time.perf_counter() - t2) * 1e3)
            if not self.dec:  # first round: check the round trips, record the chunk's size
                if not np.array_equal(back, data) or (self.per_view and not np.array_equal(mem, data)):
                    raise AssertionError(f"{self.name} {self.config.name}: unit {u} does not round-trip")
                self.nbytes[u] = self.chunk_file(u).stat().st_size
        if enc:
            self.enc.append(enc)
        self.dec.append(dec)
        self.codec.append(codec)

    def decode_bytes(self, raw: bytes, like: np.ndarray) -> np.ndarray:
        """The chunk decoded in memory by the same libraries zarr's codecs call, without zarr (codec cost only)."""
        cfg, buf = self.config, np.frombuffer(raw, np.uint8)
        if cfg.crc:
            if google_crc32c.value(buf[:-4]) != int.from_bytes(buf[-4:].tobytes(), "little"):
                raise ValueError("crc32c mismatch")
            buf = buf[:-4]
        if cfg.kind == "blosc":
            out = numcodecs_blosc.decompress(buf)
        else:
            out = _ZSTD.decode(buf)
            if cfg.kind == "shuf+zstd":
                out = numcodecs.Shuffle(elementsize=like.dtype.itemsize).decode(out)
        a = np.frombuffer(out, like.dtype)
        if cfg.transpose:
            order = Config.LAYOUTS[cfg.transpose]
            stored = a.reshape([like.shape[i] for i in order])
            return np.ascontiguousarray(stored.transpose(np.argsort(order)))
        return a.reshape(like.shape)

    def flips(self, n: int) -> dict[str, int]:
        """Flip single bits at ``n`` spread positions of unit 0's chunk file, one at a time; classify each read."""
        f = self.chunk_file(0)
        orig = f.read_bytes()
        want = self.units[0]
        out = {"error": 0, "silent": 0, "same": 0}
        for i, pos in enumerate(np.linspace(0, len(orig) - 1, n).astype(int)):
            bad = bytearray(orig)
            bad[pos] ^= 1 << (i % 8)
            f.write_bytes(bytes(bad))
            try:
                got = np.asarray(self.array[self.selection(0)])
            except Exception:
                out["error"] += 1
            else:
                out["same" if np.array_equal(got, want) else "silent"] += 1
        f.write_bytes(orig)
        return out

    def summary(self, rows_per_unit: int) -> dict[str, Any]:
        enc = [x for r in self.enc for x in r]
        dec = [x for r in self.dec for x in r]
        dec_ms = statistics.median(dec)
        codec = [x for r in self.codec for x in r]
        return {
            "array": self.name,
            "config": self.config.name,
            "bytes_per_unit": statistics.mean(self.nbytes),
            "bytes_per_row": statistics.mean(self.nbytes) / rows_per_unit,
            "raw_bytes_per_row": self.units[0].nbytes / rows_per_unit if self.units[0].dtype.kind != "O" else None,
            "enc_ms": statistics.median(enc),
            "dec_ms": dec_ms,
            "dec_ms_per_128_rows": dec_ms * 128 / self.cap,
            "codec_dec_ms": statistics.median(codec) if codec else None,
            "dec_round_medians": [statistics.median(r) for r in self.dec],
        }


def run_trials(trials: list[Trial], rounds: int, seed: int, write_rounds: int = 2) -> None:
    """Every trial once per round, in a new random order each round; writes are timed in the first rounds only."""
    rng = random.Random(seed)
    for i in range(rounds):
        order = list(trials)
        rng.shuffle(order)
        for t in order:
            t.round(write=i < write_rounds)


# -- per-view study -----------------------------------------------------------------------------
def make_units(teacher: SyntheticTeacher, args: argparse.Namespace, views: int) -> tuple[list[dict], dict]:
    """Per unit: logits reduced for every K. Returns units[u][K] = {array: data}, and teacher stats."""
    rng = np.random.default_rng(args.seed)
    units, stats = [], {}
    for u in range(args.units):
        g = teacher.unit(args.cap, views, rng, args.mix_prob, args.order)
        if u == 0:
            stats = teacher_stats(g["logits"][: min(views, 4)], g["lam"])
        units.append({k: reduce(g["logits"], k, args.logit_dtype) for k in args.k} | {"labels": g["labels"]})
        del g
    return units, stats


def per_view_study(
    tmp: Path, units: list[dict], k: int, b: int, configs: list[Config], args, flips: bool
) -> list[dict]:
    trials = []
    for i, cfg in enumerate(configs):
        for name in PER_VIEW:
            data = [np.ascontiguousarray(u[k][name][:b]) for u in units]
            trials.append(Trial(tmp / f"k{k}b{b}" / f"{i}-{name}", cfg, name, data))
    run_trials(trials, args.rounds, args.seed + k + b)
    rows = []
    for t in trials:
        r = t.summary(b * args.cap) | {"K": k, "B": b, "detects_by_design": t.config.detects_by_design}
        if flips:
            r["flips"] = t.flips(args.flips)
        rows.append(r)
    shutil.rmtree(tmp / f"k{k}b{b}")
    return rows


def per_shard_study(tmp: Path, args: argparse.Namespace, configs: list[Config]) -> list[dict]:
    rng = np.random.default_rng(args.seed + 1)
    wnids = np.sort(rng.choice(np.arange(1440764, 15075141), NUM_CLASSES, replace=False))
    rows = []
    for order in ("shuffled", "class"):
        data: dict[str, list[np.ndarray]] = {name: [] for name in PER_SHARD}
        for _ in range(args.units):
            labels = rng.integers(0, NUM_CLASSES, args.cap)
            nums = rng.integers(1, 15000, args.cap)
            if order == "class":
                o = np.lexsort((nums, labels))
                labels, nums = labels[o], nums[o]
            data["labels"].append(labels.astype(np.int32))
            data["keys"].append(np.array([f"n{wnids[c]:08d}_{x}" for c, x in zip(labels, nums, strict=True)]))
            data["digests"].append(rng.integers(1, 2**63, args.cap, dtype=np.uint64))
        trials = [
            Trial(tmp / f"shard-{order}" / f"{i}-{name}", cfg, name, data[name])
            for i, cfg in enumerate(configs)
            for name in PER_SHARD
        ]
        run_trials(trials, max(1, args.rounds // 2), args.seed)
        rows += [t.summary(args.cap) | {"order": order} for t in trials]
        shutil.rmtree(tmp / f"shard-{order}")
    return rows


def marker_bytes(tmp: Path) -> int:
    """Bytes of one unit's completion marker with today's codec (two int64)."""
    a = zarr.create_array(
        store=LocalStore(tmp / "done"),
        shape=(1, 1, 2),
        chunks=(1, 1, 2),
        dtype="int64",
        fill_value=-1,
        compressors=[ZstdCodec(level=0, checksum=True)],
    )
    a[0, 0, :] = np.array([1000, -4242424242424242424], np.int64)
    return (tmp / "done" / "c" / "0" / "0" / "0").stat().st_size


def checksum_ms(units: list[dict], k: int, b: int, cap: int) -> float:
    """Today's per-unit cost of ``unit_checksum`` (BLAKE2b over the decoded unit), for scale."""
    u = units[0][k]
    unit = UnitData(
        u["values"][:b],
        u["indices"][:b],
        u["logsumexp"][:b],
        np.zeros(cap, np.int32),
        np.array([f"n01440764_{i}" for i in range(cap)], dtype=object),
        np.ones(cap, np.uint64),
    )
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        unit_checksum(0, 0, cap, unit)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# -- choosing -----------------------------------------------------------------------------------
_COSTS = ("bytes_per_row", "dec_ms", "codec_dec_ms", "enc_ms")


def _pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on every cost (bytes, decode through zarr, decode of the codecs, encode)."""

    def beats(q: dict, r: dict) -> bool:
        return all(q[c] <= r[c] for c in _COSTS) and any(q[c] < r[c] for c in _COSTS)

    return [r for r in rows if not any(beats(q, r) for q in rows)]


def _simplest(rows: list[dict], min_gain: float) -> list[dict]:
    """Drop transposed configurations that save less than ``min_gain`` bytes per row over C order."""
    plain = {r["config"]: r["bytes_per_row"] for r in rows if ":" not in r["config"]}
    out = []
    for r in rows:
        layout, _, base = r["config"].rpartition(":")
        if not layout or base not in plain or plain[base] - r["bytes_per_row"] >= min_gain:
            out.append(r)
    return out


def choose(
    rows: list[dict], target: float, today: dict[str, float], tolerance: float, detect: bool, min_gain: float
) -> dict[str, Any]:
    """Per-array combinations of configurations for the three per-view arrays (main K and B).

    ``within_target``: total bytes per (sample, view) <= ``target``, lowest total decode median.
    ``smallest``: fewest bytes. ``smallest_not_slower``: fewest bytes whose total decode medians,
    through zarr and of the codecs alone, are both at most ``(1 + tolerance)`` times today's.
    ``smallest_not_slower_cheap_encode``: the same, with at most twice today's encode time too. With
    ``detect``, only configurations with no silent bit flip (zstd's checksum, or crc32c after blosc)
    take part. ``numcodecs.shuffle`` chains never do: they are outside the zarr v3 spec, and the cache
    format promises that other tools can read it. A transpose filter takes part only where it saves at
    least ``min_gain`` bytes per (sample, view) for its array (a simpler chain otherwise). None where
    nothing qualifies.
    """
    per_array = {}
    for name in PER_VIEW:
        cands = [r for r in rows if r["array"] == name and not r["config"].split(":")[-1].startswith("shuf+")]
        if detect:
            cands = [r for r in cands if r["detects_by_design"] and r.get("flips", {}).get("silent", 0) == 0]
        per_array[name] = _pareto(_simplest(cands, min_gain))
    combos = []
    for combo in itertools.product(*(per_array[n] for n in PER_VIEW)):
        c = {"configs": {r["array"]: r["config"] for r in combo}}
        combos.append(c | {cost: sum(r[cost] for r in combo) for cost in _COSTS})

    def not_slower(c: dict) -> bool:
        return all(c[t] <= (1 + tolerance) * today[t] for t in ("dec_ms", "codec_dec_ms"))

    within = [c for c in combos if c["bytes_per_row"] <= target]
    fast = [c for c in combos if not_slower(c)]
    cheap = [c for c in fast if c["enc_ms"] <= 2 * today["enc_ms"]]

    def smallest(cs: list[dict]) -> dict | None:
        return min(cs, key=lambda c: (c["bytes_per_row"], c["dec_ms"])) if cs else None

    return {
        "within_target": min(within, key=lambda c: c["dec_ms"]) if within else None,
        "smallest": smallest(combos),
        "smallest_not_slower": smallest(fast),
        "smallest_not_slower_cheap_encode": smallest(cheap),
    }


def combo_row(rows: list[dict], configs: dict[str, str], k: int, b: int) -> dict[str, Any] | None:
    picked = [
        next((r for r in rows if r["K"] == k and r["B"] == b and r["array"] == a and r["config"] == c), None)
        for a, c in configs.items()
    ]
    if any(p is None for p in picked):
        return None
    rounds = len(picked[0]["dec_round_medians"])
    return {
        "K": k,
        "B": b,
        "bytes": {p["array"]: p["bytes_per_row"] for p in picked},
        "bytes_per_row": sum(p["bytes_per_row"] for p in picked),
        "raw_bytes_per_row": sum(p["raw_bytes_per_row"] for p in picked),
        "enc_ms": sum(p["enc_ms"] for p in picked),
        "dec_ms": sum(p["dec_ms"] for p in picked),
        "dec_ms_per_128_rows": sum(p["dec_ms_per_128_rows"] for p in picked),
        "codec_dec_ms": sum(p["codec_dec_ms"] for p in picked),
        "dec_round_totals": [sum(p["dec_round_medians"][i] for p in picked) for i in range(rounds)],
        "flips": {p["array"]: p.get("flips") for p in picked},
    }


# -- report -------------------------------------------------------------------------------------
MAIN_CANDIDATES = [
    "today (zstd-0)",
    "zstd-1",
    "zstd-9",
    "zstd-19",
    "shuf+zstd-3",
    "blosc-lz45-bit+crc",
    "blosc-zstd5-byte+crc",
    "blosc-zstd7-byte+crc",
    "blosc-zstd5-bit+crc",
    "blosc-zstd9-bit+crc",
    "Tv:blosc-zstd7-byte+crc",
    "Tr:blosc-zstd9-bit+crc",
    "Tr:zstd-19",
]


def uniform_rows(rows: list[dict], k: int, b: int, names: list[str] | None = None) -> list[dict]:
    """One combined row per configuration used for all three per-view arrays, smallest first."""
    configs = dict.fromkeys(r["config"] for r in rows if r["K"] == k and r["B"] == b)
    out = []
    for c in configs if names is None else [n for n in names if n in configs]:
        row = combo_row(rows, dict.fromkeys(PER_VIEW, c), k, b)
        if row is not None:
            out.append(row | {"config": c})
    return sorted(out, key=lambda r: r["bytes_per_row"])


def _flips(row: dict[str, Any]) -> str:
    f = [x for x in row["flips"].values() if x]
    return f"{sum(x['error'] for x in f)}/{sum(x['silent'] for x in f)}/{sum(x['same'] for x in f)}" if f else "-"


def _rest(r: dict[str, Any]) -> list[Any]:
    return [r["codec_dec_ms"], r["dec_ms_per_128_rows"], r["enc_ms"], _flips(r)]


def table(rows: list[dict]) -> str:
    head = ["config", "K", "B", "values", "indices", "lse", "total B/(s,v)", "dec ms/unit", "codec-only ms"]
    lines = [
        [r["config"], r["K"], r["B"], *(r["bytes"][a] for a in PER_VIEW), r["bytes_per_row"], r["dec_ms"], *_rest(r)]
        for r in rows
    ]
    return md_table([*head, "dec ms/128 rows", "enc ms/unit", "flips err/silent/same"], lines)


def print_report(doc: dict[str, Any], rows: list[dict]) -> None:
    res, s = doc["results"], doc["settings"]
    mk, mb = s["main_k"], s["main_b"]
    print(f"\n# Per-view arrays, SYNTHETIC teacher logits, K={mk}, B={mb}, cap={s['cap']}: every configuration")
    print("(bytes per (sample, view); ms medians over rounds x units; flips over the three arrays' chunks)")
    print(table(uniform_rows(rows, mk, mb)))
    print("\n# Main candidates at every K and B measured")
    print(table([r for kb in res["measured"] for r in uniform_rows(rows, *kb, MAIN_CANDIDATES)]))
    for detect, key in ((True, "choices"), (False, "choices_without_detection")):
        print(f"\n# Choices at K={mk} B={mb}" + ("" if detect else " (blosc without crc allowed: flips go unnoticed)"))
        for what, c in res[key].items():
            costs = f"dec {c['dec_ms']:.2f} ms (codecs {c['codec_dec_ms']:.2f}), enc {c['enc_ms']:.1f} ms" if c else ""
            line = f"{c['bytes_per_row']:.2f} B/(s,v), {costs}: {c['configs']}" if c else "none"
            print(f"  {what}: {line}")
    aa = res["noise_same_codec"]
    print(f"\nnoise: zstd-3 is today's codec; its decode median / today's = {aa['dec_ratio']:.3f} (zarr),")
    print(f"  {aa['codec_ratio']:.3f} (codec only); per round {aa['dec_ratio_min']:.3f} .. {aa['dec_ratio_max']:.3f}")
    print(f"\nrecommended ({res['recommended_is']}):")
    if res["recommended"]:
        print(f"  {res['recommended']['configs']}")
        for a, code in res["recommended_code"].items():
            print(f"  {a}: {code}")
        lines = []
        for c in res["compare_today"]:
            r, t = c["recommended"], c["today"]
            ratios = [c["dec_ratio_median"], min(c["dec_ratio_per_round"]), max(c["dec_ratio_per_round"])]
            rest = [c["codec_ratio"], t["enc_ms"], r["enc_ms"], r["dec_ms_per_128_rows"], _flips(r)]
            lines.append(
                [c["K"], c["B"], t["bytes_per_row"], r["bytes_per_row"], t["dec_ms"], r["dec_ms"], *ratios, *rest]
            )
        head = ["K", "B", "today B", "rec B", "today dec ms", "rec dec ms", "dec ratio", "min/round", "max/round"]
        tail = ["codec-only ratio", "today enc ms", "rec enc ms", "rec dec ms/128", "rec flips"]
        print(md_table(head + tail, lines))
    print("\n# Per-shard arrays: best codec per array (bytes per row of the shard)")
    for key, r in res["best_per_shard"].items():
        print(f"  {key}: {r['config']} {fmt_num(r['bytes_per_row'])} B/row (dec {fmt_num(r['dec_ms'])} ms)")
    for order, v in res["per_shard_bytes_per_sample_view"].items():
        amortised = ", ".join(f"{k} {x:.3f}" for k, x in v.items())
        print(f"  {order} rows: labels+keys+digests per (sample, view): {amortised}")
    print(f"completion marker: {res['marker_bytes_per_unit']} B per unit")
    print(f"unit_checksum (BLAKE2b over a decoded unit, K={mk} B={mb}): {res['unit_checksum_ms']:.2f} ms per unit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a seconds-long run: few configs, K=10, B=10, 1 unit")
    ap.add_argument("--k", type=int, nargs="+", default=[5, 10, 20], help="K values (at the main B)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[10, 8, 20], help="view blocks B (the first is main)")
    ap.add_argument("--cap", type=int, default=1000, help="rows per shard (unit)")
    ap.add_argument("--units", type=int, default=4, help="units (shards) per array")
    ap.add_argument("--rounds", type=int, default=7, help="decode rounds (writes are timed in the first 2)")
    ap.add_argument("--flips", type=int, default=24, help="bit flips per chunk (main K and B only)")
    ap.add_argument("--target", type=float, default=25.0, help="bytes per (sample, view) for the per-view arrays")
    ap.add_argument("--tolerance", type=float, default=0.05, help="decode slowdown vs today counted as not slower")
    ap.add_argument("--min-gain", type=float, default=0.1, help="bytes per (s,v) a transpose must save to be chosen")
    ap.add_argument("--mix-prob", type=float, default=1.0, help="fraction of view pairs mixed (DeiT: 1.0)")
    ap.add_argument("--order", choices=["shuffled", "class"], default="shuffled", help="rows of a shard")
    ap.add_argument("--group-boost", type=float, default=0.2, help="synthetic teacher: class-group logit boost")
    ap.add_argument("--logit-dtype", choices=["bf16", "fp32"], default="bf16", help="teacher output precision")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "codecs.json"))
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    args = ap.parse_args()
    if args.quick:
        args.k, args.blocks, args.units, args.rounds, args.flips = [10], [10], 1, 2, 8
    torch.set_num_threads(1)
    numcodecs_blosc.use_threads = False  # phase 2 decodes in loader workers: one thread per decode
    main_k = 10 if 10 in args.k else args.k[0]
    main_b = args.blocks[0]
    measured = (
        [(main_k, main_b)] + [(k, main_b) for k in args.k if k != main_k] + [(main_k, b) for b in args.blocks[1:]]
    )
    t_start = time.perf_counter()

    teacher = SyntheticTeacher(seed=args.seed, group_boost=args.group_boost)
    units, stats = make_units(teacher, args, max(args.blocks))
    print(f"synthetic teacher, DeiT views ({teacher.num_groups} class groups): ", end="")
    print(", ".join(f"{k} {v:.3g}" for k, v in stats.items()))
    configs = per_view_configs(args.quick)
    by_name = {c.name: c for c in configs}
    today = dict.fromkeys(PER_VIEW, "today (zstd-0)")
    with tempfile.TemporaryDirectory(prefix="stillroom-codecs-") as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        rows = per_view_study(tmp, units, main_k, main_b, configs, args, flips=True)
        print(
            f"K={main_k} B={main_b}: {len(configs)} configs x 3 arrays in {time.perf_counter() - t0:.1f} s", flush=True
        )
        today_costs = combo_row(rows, today, main_k, main_b)
        how = {"target": args.target, "today": today_costs, "tolerance": args.tolerance, "min_gain": args.min_gain}
        choices = choose(rows, detect=True, **how)
        choices_any = choose(rows, detect=False, **how)
        rec = choices["within_target"] or choices["smallest_not_slower"]
        # The other K and B: the main candidates and every configuration a choice picked.
        picked = {c for ch in (choices, choices_any) for x in ch.values() if x for c in x["configs"].values()}
        others = [by_name[n] for n in dict.fromkeys([*MAIN_CANDIDATES, *sorted(picked)]) if n in by_name]
        for k, b in measured[1:]:
            t0 = time.perf_counter()
            rows += per_view_study(tmp, units, k, b, others, args, flips=False)
            print(f"K={k} B={b}: {len(others)} configs x 3 arrays in {time.perf_counter() - t0:.1f} s", flush=True)
        shard_rows = per_shard_study(tmp, args, per_shard_configs(args.quick))
        marker = marker_bytes(tmp)
    check_ms = checksum_ms(units, main_k, main_b, args.cap)

    same = combo_row(rows, dict.fromkeys(PER_VIEW, "zstd-3"), main_k, main_b)
    t_main = combo_row(rows, today, main_k, main_b)
    per_round = [x / y for x, y in zip(same["dec_round_totals"], t_main["dec_round_totals"], strict=True)]
    noise = {
        "dec_ratio": same["dec_ms"] / t_main["dec_ms"],
        "codec_ratio": same["codec_dec_ms"] / t_main["codec_dec_ms"],
        "dec_ratio_min": min(per_round),
        "dec_ratio_max": max(per_round),
    }
    compare = []
    if rec:
        for k, b in measured:
            r, t = combo_row(rows, rec["configs"], k, b), combo_row(rows, today, k, b)
            ratios = [x / y for x, y in zip(r["dec_round_totals"], t["dec_round_totals"], strict=True)]
            compare.append(
                {"K": k, "B": b, "recommended": r, "today": t, "dec_ratio_median": r["dec_ms"] / t["dec_ms"]}
                | {"dec_ratio_per_round": ratios, "codec_ratio": r["codec_dec_ms"] / t["codec_dec_ms"]}
            )
    best_shard = {}
    for order in ("shuffled", "class"):
        for name in PER_SHARD:
            cands = [r for r in shard_rows if r["order"] == order and r["array"] == name]
            best_shard[f"{order}/{name}"] = min(cands, key=lambda r: (round(r["bytes_per_row"], 2), r["dec_ms"]))
    amortised = {
        order: {f"V={v}": sum(best_shard[f"{order}/{n}"]["bytes_per_row"] for n in PER_SHARD) / v for v in (8, 10, 300)}
        for order in ("shuffled", "class")
    }
    itemsize = {"values": 2, "indices": 2, "logsumexp": 4}
    code = {a: by_name[c].code(itemsize[a]) for a, c in rec["configs"].items()} if rec else {}
    settings = {k: getattr(args, k) for k in ("quick", "k", "blocks", "cap", "units", "rounds", "flips", "target")}
    settings |= {"tolerance": args.tolerance, "min_gain": args.min_gain, "group_boost": args.group_boost}
    settings |= {"mix_prob": args.mix_prob, "order": args.order, "logit_dtype": args.logit_dtype, "seed": args.seed}
    settings |= {"main_k": main_k, "main_b": main_b, "temperatures": TEMPS, "blosc_threads": 1}
    doc = write_result(
        args.out,
        "codecs",
        _rounded(
            {
                "measured": measured,
                "per_view": _table(rows, PER_VIEW_COLUMNS),
                "per_shard": _table(shard_rows, PER_SHARD_COLUMNS),
                "best_per_shard": best_shard,
                "per_shard_bytes_per_sample_view": amortised,
                "marker_bytes_per_unit": marker,
                "noise_same_codec": noise,
                "unit_checksum_ms": check_ms,
                "choices": choices,
                "choices_without_detection": choices_any,
                "recommended": rec,
                "recommended_is": "within_target" if choices["within_target"] else "smallest_not_slower",
                "recommended_code": code,
                "compare_today": compare,
            }
        ),
        synthetic=True,
        teacher_model=_rounded(stats),
        settings=settings,
        wall_s=round(time.perf_counter() - t_start, 1),
        note=args.note,
    )
    print_report(doc, rows)
    print(f"\nwrote {args.out}")


PER_VIEW_COLUMNS = ("K", "B", "array", "config", "bytes_per_row", "dec_ms", "codec_dec_ms", "enc_ms", "flips")
PER_SHARD_COLUMNS = ("order", "array", "config", "bytes_per_row", "dec_ms", "enc_ms")


def _table(rows: list[dict], columns: tuple[str, ...]) -> dict[str, Any]:
    """Rows as one ``|``-separated line each, named by ``columns`` (flips: error/silent/same, - where not run)."""

    def cell(r: dict, c: str) -> Any:
        if c == "flips":
            f = r.get("flips")
            return f"{f['error']}/{f['silent']}/{f['same']}" if f else "-"
        return _rounded(r[c])

    return {"columns": "|".join(columns), "rows": ["|".join(str(cell(r, c)) for c in columns) for r in rows]}


def _rounded(x: Any) -> Any:
    """Floats to 4 significant digits (the JSON stays small; timings are not more precise than that)."""
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_rounded(v) for v in x]
    return x


if __name__ == "__main__":
    main()
