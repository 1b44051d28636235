"""Error of soft distillation targets rebuilt from the top-k cache, and designs that shrink it.

What the cache stores per (sample, view): the top-K teacher logits (``values``, fp16, descending),
their class ids (``indices``, int16) and ``logsumexp(logits / tau)`` over all classes per cached
temperature (fp32; tau in {1, 3}). ``pipeline.models.losses.soft_target_probs`` rebuilds the teacher's
distribution at tau: exact top-K probabilities ``exp(values / tau - lse_tau)``, the remaining
mass spread uniformly over the other ``C - K`` classes. This script measures, per teacher and
storage design, at tau 1 and 3:

* tail mass ``R_tau = 1 - sum_{j: indices_j >= 0} exp(values_j / tau - lse_tau)`` (exact from what
  is stored; unused columns hold value 0 and index -1 and must be masked by the index), mean / p50 /
  p95 over rows, before any clamping (it can be slightly negative: fp16 values);
* mean KL(full || rebuilt) per row (nats, not scaled by tau^2);
* the relative error of DeiT's soft distillation term (``KL(p || softmax(s / tau)) * tau^2 / numel``,
  ``pipeline.models.losses.soft_distillation`` on the rebuilt target) against DeiT's own
  ``F.kl_div(log_softmax(s / tau), log_softmax(t / tau), reduction='sum', log_target=True) * tau^2
  / numel`` on the FULL teacher logits. The JSON also holds ``loss_rel_err_with_entropy``: the
  same with the teacher's exact entropy at tau stored per row (fp32 per tau) in place of the rebuilt
  target's; the entropy is constant in the student, so it moves the loss value, not the gradient;
* the cosine between the gradients of that term w.r.t. the student logits (autograd), rebuilt vs
  full, in float64 (the gradients are O(1 / numel), below ``F.cosine_similarity``'s eps): mean and
  p5 over rows, and over the whole batch flattened (what an SGD step sees);
* bytes per (sample, view): each stored array written through zarr v3 with
  ``ZstdCodec(level=0, checksum=True)``, chunks ``[10 views, 1000 rows, columns]`` and the cache's
  fill values, chunk files on disk divided by rows (array metadata, ~0.5 KB per array, excluded),
  so padded unused columns count as what they cost compressed; and the raw (uncompressed) size.

Students: ``near`` = teacher logits + N(0, 1) (a student that has nearly learnt the teacher) and
``N(0,1)`` (an untrained-like student).

Teachers (1000 classes unless said; ALL SYNTHETIC except ``digits``):

* ``gauss-s2/s4/s8`` (synthetic): logits i.i.d. N(0, s^2); s=4 is the review's case;
* ``peaked`` (synthetic): ``bench.storage_fidelity.synthetic_logits`` (N(0, 1.5^2) background, one
  dominant class +U(4, 12), five related classes);
* ``mixup`` (synthetic): a model of a teacher on DeiT mixup/cutmix views, the log of
  ``lam * softmax(a) + (1 - lam) * softmax(b)`` for two independent ``peaked`` rows, lam ~ Beta(0.8,
  0.8) or Beta(1, 1) with probability 1/2 each (DeiT's mixup 0.8 / cutmix 1.0);
* ``digits`` (trained, 10 classes): a ``regnety_002`` trained here on scikit-learn's digits (demo
  teacher settings, ``--digits-epochs``), logits on DeiT-recipe views
  (``bench.storage_fidelity.digits_logits``); only with ``--digits``. With 10 classes, K = 9 is
  exact, so it says little about 1000 classes.

Designs (the rebuild is exact on the kept logits in every design):

* ``K=k``: fixed top-k (today's format);
* ``... logp16``: the values stored as fp16(logit - lse at tau 1) (log-probabilities) instead of
  fp16(logit): same bytes, but precise near 0, where a confident teacher's mass is;
* ``mass m/Kmax/kmin``: per-row k = the fewest top logits whose probability at the largest cached
  tau reaches m, clamped to [kmin, Kmax]; stored as Kmax columns, unused ones (0, -1); the uniform
  spread covers ``C - k_row`` classes (``reduce_by_mass``);
* ``kl e/Kmax/kmin``: same storage, per-row k = the fewest top logits whose uniform-tail rebuild has
  KL(full || rebuilt) <= e nats at every cached tau (exact: the encoder has the full logits;
  ``kl_curves``, ``reduce_by_kl``); ``kl@tau1``: the bound at tau 1 only;
* ``K=k+tail bb[s1,s2,..]``: fixed top-k plus a bucketed tail (``bucket_tail``): every other class
  gets a b-bit code, its bucket among the tail ranked by logit (the next s1 ranks, the next s2, ...,
  the rest; ``mass``: buckets of equal mass at the largest tau); per bucket but the last, its
  logsumexp at each cached tau (fp32). The rebuild spreads each bucket's exact mass uniformly over
  its classes (the last bucket gets the remainder). Costs ``C * b / 8`` bytes raw (3 bits: 2 codes
  per byte) plus ``4 T (2^b - 1)``.

Machine and command of the committed result (bench/results/soft_targets.json): Intel(R) Xeon(R)
Processor (lscpu model name), 2 cores shared with other work, torch 2 threads; 2.5 to 5 min with the
load (the digits teacher alone trains for 40 to 160 s)::

    PYTHONPATH=. nice -n 10 .venv/bin/python bench/soft_targets.py --digits

``--quick`` runs 4 designs on 500 rows per synthetic teacher in seconds (a smoke test, not a
measurement).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import zarr  # noqa: E402
from zarr.codecs import ZstdCodec  # noqa: E402

from bench.common import RESULTS, md_table, write_result  # noqa: E402
from bench.storage_fidelity import synthetic_logits  # noqa: E402
from pipeline.models.losses import soft_distillation  # noqa: E402
from pipeline.models.targets import soft_target_probs, topk_targets  # noqa: E402

TEMPS = [1.0, 3.0]
FILL_VALUE = 0.0  # what the cache's ``values`` array holds where nothing was written
FILL_INDEX = -1  # ... and its ``indices`` array
VIEWS = 10  # chunk [VIEWS, ROWS_PER_CHUNK, columns], as the cache writes it
ROWS_PER_CHUNK = 1000


# -- teachers (synthetic unless said) ------------------------------------------------------------
def gaussian_teacher(n: int, c: int, s: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * s


def mixup_teacher(n: int, c: int, seed: int) -> torch.Tensor:
    """Log of a two-component mixture of peaked rows: a model of a teacher on a mixup/cutmix view."""
    g = torch.Generator().manual_seed(seed)
    a = torch.log_softmax(synthetic_logits(n, c, seed + 1), -1)
    b = torch.log_softmax(synthetic_logits(n, c, seed + 2), -1)
    torch.manual_seed(seed)
    lam_mix = torch.distributions.Beta(0.8, 0.8).sample((n,))
    lam_cut = torch.distributions.Beta(1.0, 1.0).sample((n,))
    lam = torch.where(torch.rand(n, generator=g) < 0.5, lam_mix, lam_cut).clamp(1e-4, 1 - 1e-4)[:, None]
    return torch.logaddexp(a + lam.log(), b + (1 - lam).log())


def digits_teacher(epochs: int, views: int, shards: int) -> tuple[torch.Tensor, str]:
    from bench.storage_fidelity import digits_logits

    ns = argparse.Namespace(teacher_checkpoint=None, teacher_epochs=epochs, views=views, digits_shards=shards)
    with tempfile.TemporaryDirectory(prefix="stillroom-soft-") as d:
        return digits_logits(Path(d), ns)


# -- what is stored, per design ------------------------------------------------------------------
@dataclass
class Stored:
    """The per-row arrays a design stores; ``extra`` holds design-specific arrays (bucketed tail)."""

    values: torch.Tensor  # [n, cols] logits as the rebuild sees them, descending; unused columns FILL_VALUE
    indices: torch.Tensor  # [n, cols] int64 in memory (int16 on disk); unused columns FILL_INDEX
    lse: torch.Tensor  # [n, T] float32
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    offset: torch.Tensor | None = None  # [n, 1]: on disk ``values - offset`` (log-probabilities), else ``values``

    def arrays(self, num_classes: int) -> dict[str, np.ndarray]:
        idx_dtype = np.int16 if num_classes <= 32767 else np.int32
        v = self.values
        if self.offset is not None:
            v = torch.where(self.indices >= 0, v - self.offset, FILL_VALUE)
        out = {
            "values": v.numpy().astype(np.float16),
            "indices": self.indices.numpy().astype(idx_dtype),
            "logsumexp": self.lse.numpy().astype(np.float32),
        }
        out.update({k: v.numpy() for k, v in self.extra.items()})
        return out


def reduce_by_mass(
    values: torch.Tensor, indices: torch.Tensor, lse_max_tau: torch.Tensor, tau: float, target: float, kmin: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row K by mass: keep the fewest top logits whose probability at ``tau`` reaches ``target``.

    ``values``/``indices`` are top-Kmax (descending; ``values`` as stored, fp16) and ``lse_max_tau``
    the logsumexp at ``tau`` (the largest cached temperature). Rows that never reach ``target`` keep
    all Kmax; every row keeps at least ``kmin``. Dropped columns get (FILL_VALUE, FILL_INDEX).
    """
    kmax = values.shape[1]
    mass = torch.cumsum(torch.exp(values.double() / tau - lse_max_tau.double()[:, None]), dim=1)
    k = ((mass < target).sum(dim=1) + 1).clamp(min(kmin, kmax), kmax)
    return _keep_first(values, indices, k)


def kl_curves(logits: torch.Tensor, lse: torch.Tensor, temps: list[float], kmax: int) -> torch.Tensor:
    """KL(full || rebuilt) of the uniform-tail rebuild keeping the top k, for k = 0..kmax, per row and tau.

    With the tail (ranks k..C-1, probabilities p_j at tau) spread uniformly, KL(k) =
    sum_tail p_j log p_j - R_k log(R_k / (C - k)), R_k = sum_tail p_j: suffix sums over the sorted
    logits, in float64 (the two terms nearly cancel). Returns ``[T, n, kmax + 1]``.
    """
    c = logits.shape[1]
    srt = torch.sort(logits.double(), dim=1, descending=True).values
    out = []
    for ti, tau in enumerate(temps):
        logp = srt / tau - lse[:, ti].double()[:, None]
        p = logp.exp()
        r = torch.flip(torch.cumsum(torch.flip(p, [1]), 1), [1])[:, : kmax + 1]  # R_k, k = 0..kmax
        s = torch.flip(torch.cumsum(torch.flip(p * logp, [1]), 1), [1])[:, : kmax + 1]
        rest = (c - torch.arange(r.shape[1], dtype=torch.float64)).clamp_min(1)[None]
        kl = s - r * torch.log(r.clamp_min(1e-300) / rest)
        out.append(F.pad(kl, (0, kmax + 1 - kl.shape[1])))  # k >= C: exact, KL 0
    return torch.stack(out)


def reduce_by_kl(
    values: torch.Tensor, indices: torch.Tensor, curves: torch.Tensor, eps: float, kmin: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row K by error: the fewest top logits whose uniform-tail rebuild has KL(full || rebuilt) <= eps.

    ``curves``: ``kl_curves`` at the temperatures that must meet the bound (``[T', n, >= Kmax + 1]``);
    the bound must hold at each. Rows that never meet it keep all Kmax; every row keeps at least ``kmin``.
    """
    kmax = values.shape[1]
    worst = curves[:, :, 1 : kmax + 1].amax(0)  # column j: keeping k = j + 1
    ok = worst <= eps
    first = torch.where(ok.any(1), ok.float().argmax(1) + 1, torch.full((values.shape[0],), kmax))
    return _keep_first(values, indices, first.clamp(min(kmin, kmax), kmax))


def _keep_first(values: torch.Tensor, indices: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.arange(values.shape[1])[None, :] < k[:, None]
    return (
        torch.where(keep, values, torch.tensor(FILL_VALUE, dtype=values.dtype)),
        torch.where(keep, indices, torch.tensor(FILL_INDEX, dtype=indices.dtype)),
    )


def bucket_tail(
    logits: torch.Tensor, indices: torch.Tensor, temps: list[float], bits: int, sizes: tuple[int, ...] = ()
) -> dict[str, torch.Tensor]:
    """Bucket codes (``bits`` per class, packed) and per-bucket logsumexp at each tau for the non-kept classes.

    The tail (classes not among the valid ``indices``) is ranked by logit and cut into 2^bits buckets:
    with ``sizes`` (2^bits - 1 counts), bucket j holds the next ``sizes[j]`` ranks and the last bucket
    the rest; without, buckets of equal mass at the largest tau. Kept classes get code 0 (the rebuild
    ignores it). Stored: the packed codes and the logsumexp of ``logits / tau`` over buckets 0..nb-2
    (fp32, ``[n, T * (nb - 1)]``); the last bucket's mass is the remainder.
    """
    n, c = logits.shape
    nb = 2**bits
    kept = _kept_mask(indices, c)
    srt, order = torch.sort(logits.masked_fill(kept, -math.inf), dim=1, descending=True)
    if sizes:
        assert len(sizes) == nb - 1, "one size per bucket but the last"
        edges = torch.cumsum(torch.tensor(sizes), 0)
        b = (torch.arange(c)[:, None] >= edges[None, :]).sum(1)[None, :].expand(n, -1)
    else:
        tmax = max(range(len(temps)), key=lambda i: temps[i])
        x = srt.double() / temps[tmax]
        p = torch.exp(x - torch.logsumexp(x, 1, keepdim=True))
        mid = torch.cumsum(p, 1) - p / 2  # tail mass before each class plus half its own, in [0, 1]
        b = (nb * mid).floor().clamp(0, nb - 1).long()
    codes = torch.empty(n, c, dtype=torch.long).scatter_(1, order, b).masked_fill(kept, 0)
    blse = torch.stack(
        [
            torch.stack(
                [torch.logsumexp(torch.where((codes == j) & ~kept, logits / tau, -math.inf), 1) for j in range(nb - 1)],
                1,
            )
            for tau in temps
        ],
        1,
    ).float()  # [n, T, nb - 1]
    return {"tail_codes": pack_codes(codes, bits), "tail_lse": blse.reshape(n, -1)}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    n, c = codes.shape
    per = 8 // bits
    pad = (-c) % per
    x = F.pad(codes, (0, pad)).reshape(n, -1, per)
    shifts = torch.arange(per) * bits
    return (x << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, c: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per) * bits
    x = (packed.long()[..., None] >> shifts) & (2**bits - 1)
    return x.reshape(packed.shape[0], -1)[:, :c]


def _kept_mask(indices: torch.Tensor, c: int) -> torch.Tensor:
    valid = indices >= 0
    idx = torch.where(valid, indices.long(), c)  # unused columns scatter into a dummy column
    return torch.zeros(indices.shape[0], c + 1, dtype=torch.bool).scatter_(1, idx, True)[:, :c]


# -- rebuild ---------------------------------------------------------------------------------------
def tail_mass(values: torch.Tensor, indices: torch.Tensor, lse_tau: torch.Tensor, tau: float) -> torch.Tensor:
    """``1 - sum_{j: indices_j >= 0} exp(values_j / tau - lse_tau)``, NOT clamped (may be slightly < 0)."""
    top = torch.exp(values.float() / tau - lse_tau.float()[:, None])
    return 1.0 - torch.where(indices >= 0, top, 0.0).sum(dim=1)


def rebuild(st: Stored, ti: int, tau: float, c: int, bits: int = 0) -> torch.Tensor:
    """Dense target at ``tau``: exact kept probabilities; the tail spread uniformly (or per bucket)."""
    valid = st.indices >= 0
    top = torch.where(valid, torch.exp(st.values.float() / tau - st.lse[:, ti, None]), 0.0)
    rest = (1.0 - top.sum(dim=1)).clamp_min(0.0)
    k = valid.sum(dim=1)
    n = top.shape[0]
    if bits == 0:
        dense = (rest / (c - k).clamp_min(1))[:, None].expand(-1, c + 1).clone()
    else:
        nb = 2**bits
        codes = unpack_codes(st.extra["tail_codes"], bits, c)
        kept = _kept_mask(st.indices, c)
        blse = st.extra["tail_lse"].reshape(n, len(TEMPS), nb - 1)[:, ti, :]
        head = torch.exp(blse - st.lse[:, ti, None])
        last = (rest - head.sum(1)).clamp_min(0.0)
        mass = torch.cat([head, last[:, None]], 1)
        count = torch.stack([((codes == j) & ~kept).sum(1) for j in range(nb)], 1).clamp_min(1)
        dense = torch.cat([(mass / count).gather(1, codes), torch.zeros(n, 1)], 1)
    dense.scatter_(1, torch.where(valid, st.indices.long(), c), top)
    return dense[:, :c]


# -- designs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Design:
    name: str
    kind: str  # fixed | mass | kl | bucket
    k: int  # fixed K, or Kmax
    target: float = 0.0  # mass target or KL bound
    kmin: int = 1
    bits: int = 0
    sizes: tuple[int, ...] = ()  # bucket: ranks per bucket but the last (empty: equal-mass buckets)
    kl_at_tau1_only: bool = False  # kl: bound at the smallest cached tau only (else at every cached tau)
    logp16: bool = False  # store fp16(logit - lse at the smallest tau) instead of fp16(logit)


def designs_for(c: int, quick: bool) -> list[Design]:
    if c <= 16:  # digits: K < C only; per-row K capped at C - 1
        kmax = c - 1
        out = [Design(f"K={k}", "fixed", k) for k in (1, 2, 5) if k < c]
        out += [Design(f"mass {m}/{kmax}/1", "mass", kmax, m, 1) for m in (0.8, 0.9, 0.95, 0.99)]
        out += [Design(f"kl {e}/{kmax}/1", "kl", kmax, e, 1) for e in (0.03, 0.01, 0.003)]
        return out
    if quick:
        return [
            Design("K=10", "fixed", 10),
            Design("mass 0.9/64/5", "mass", 64, 0.9, 5),
            Design("kl 0.01/64/5", "kl", 64, 0.01, 5),
            Design("K=10+tail 2b[16,48,160]", "bucket", 10, bits=2, sizes=(16, 48, 160)),
        ]
    out = [Design(f"K={k}", "fixed", k) for k in (5, 10, 20, 50, 100)]
    out += [Design(f"K={k} logp16", "fixed", k, logp16=True) for k in (10, 100)]
    out += [Design(f"mass {m}/{kx}/5", "mass", kx, m, 5) for kx in (32, 64, 128) for m in (0.8, 0.9, 0.95, 0.99)]
    out += [Design(f"mass {m}/64/1", "mass", 64, m, 1) for m in (0.8, 0.9)]
    out += [Design(f"kl {e}/{kx}/5", "kl", kx, e, 5) for kx in (64, 128) for e in (0.03, 0.01)]
    out += [Design(f"kl@tau1 0.01/{kx}/5", "kl", kx, 0.01, 5, kl_at_tau1_only=True) for kx in (32, 64)]
    out += [
        Design("K=10+tail 1b[64]", "bucket", 10, bits=1, sizes=(64,)),
        Design("K=5+tail 2b[16,48,160]", "bucket", 5, bits=2, sizes=(16, 48, 160)),
        Design("K=10+tail 2b[16,48,160]", "bucket", 10, bits=2, sizes=(16, 48, 160)),
        Design("K=10+tail 2b mass", "bucket", 10, bits=2),
        Design("K=10+tail 3b[8..256]", "bucket", 10, bits=3, sizes=(8, 16, 32, 64, 128, 256, 256)),
        Design("mass 0.9/64/5 logp16", "mass", 64, 0.9, 5, logp16=True),
        Design("K=10+tail 2b[16,48,160] logp16", "bucket", 10, bits=2, sizes=(16, 48, 160), logp16=True),
    ]
    return out


def encode(d: Design, logits: torch.Tensor, top: dict) -> Stored:
    """What design ``d`` stores for ``logits``; ``top`` caches top-k results and KL curves across designs."""
    c = logits.shape[1]
    kk = min(d.k, c)
    if kk not in top:
        v, i, lse = topk_targets(logits, kk, TEMPS)  # what cache-teacher stores (fp16 values)
        top[kk] = (v, i, lse)
    v, i, lse = top[kk]
    offset = None
    if d.logp16:  # log-probabilities at tau 1 in fp16: precise where the mass is (near 0)
        v32, _, _ = topk_targets(logits, kk, TEMPS, half=False)
        offset = lse[:, :1]
        v = (v32 - offset).half().float() + offset
    tmax = max(range(len(TEMPS)), key=lambda j: TEMPS[j])
    if d.kind == "mass":
        v, i = reduce_by_mass(v, i, lse[:, tmax], TEMPS[tmax], d.target, d.kmin)
    elif d.kind == "kl":
        if "curves" not in top or top["curves"].shape[2] < kk + 1:
            top["curves"] = kl_curves(logits, lse, TEMPS, max(kk, 128))
        imin = min(range(len(TEMPS)), key=lambda j: TEMPS[j])
        curves = top["curves"][imin : imin + 1] if d.kl_at_tau1_only else top["curves"]
        v, i = reduce_by_kl(v, i, curves, d.target, d.kmin)
    extra = bucket_tail(logits, i, TEMPS, d.bits, d.sizes) if d.kind == "bucket" else {}
    return Stored(v, i, lse, extra, offset)


# -- bytes -----------------------------------------------------------------------------------------
_FILL = {"values": FILL_VALUE, "indices": FILL_INDEX}


def disk_bytes(arrays: dict[str, np.ndarray], tmp: Path) -> dict[str, float]:
    """Chunk bytes on disk per row for each array, written as the cache writes them."""
    out = {}
    for name, a in arrays.items():
        n = a.shape[0]
        views = VIEWS if n % VIEWS == 0 else 1
        a3 = a.reshape(views, n // views, a.shape[1])
        path = tmp / f"{name}-{time.monotonic_ns()}"
        z = zarr.create_array(
            store=str(path),
            shape=a3.shape,
            chunks=(views, min(ROWS_PER_CHUNK, a3.shape[1]), a3.shape[2]),
            dtype=a3.dtype,
            fill_value=_FILL.get(name, 0),
            compressors=ZstdCodec(level=0, checksum=True),
            config={"write_empty_chunks": True},
        )
        z[:] = a3
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
        out[name] = total / n
    return out


# -- fidelity --------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Full-logit quantities at one tau, computed once per teacher."""

    tau: float
    logp: torch.Tensor
    p: torch.Tensor
    entropy: torch.Tensor  # [n] teacher entropy at tau
    students: dict[str, tuple[torch.Tensor, float, torch.Tensor]]  # name -> (logits, full loss, full grad)


def deit_soft_full(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """DeiT's DistillationLoss, distillation_type='soft', on the full teacher logits."""
    return (
        F.kl_div(
            F.log_softmax(student / tau, dim=1),
            F.log_softmax(teacher / tau, dim=1),
            reduction="sum",
            log_target=True,
        )
        * (tau * tau)
        / student.numel()
    )


def reference(teacher: torch.Tensor, students: dict[str, torch.Tensor], tau: float) -> Reference:
    logp = torch.log_softmax(teacher / tau, dim=1)
    p = logp.exp()
    out = {}
    for name, s in students.items():
        z = s.clone().requires_grad_(True)
        loss = deit_soft_full(z, teacher, tau)
        (g,) = torch.autograd.grad(loss, z)
        out[name] = (s, float(loss.detach()), g)
    return Reference(tau, logp, p, -(p * logp).sum(1), out)


def fidelity(ref: Reference, q: torch.Tensor) -> dict:
    kl = (ref.p * (ref.logp - torch.log(q.clamp_min(1e-30)))).sum(1)
    h_q = -torch.where(q > 0, q * torch.log(q.clamp_min(1e-30)), 0.0).sum(1)
    res = {
        "kl_mean": float(kl.mean()),
        "kl_p95": float(kl.quantile(0.95)),
        "rows_q_zero_where_p_positive": int(((q <= 0) & (ref.p > 0)).any(1).sum()),
    }
    for name, (s, full, g_full) in ref.students.items():
        z = s.clone().requires_grad_(True)
        loss = soft_distillation(z, q, ref.tau)
        (g,) = torch.autograd.grad(loss, z)
        # with the teacher entropy stored, the loss uses it instead of the rebuilt target's
        loss = loss.detach()
        loss_h = float(loss) + float((h_q - ref.entropy).sum()) * ref.tau**2 / s.numel()
        cos = _cosine(g, g_full, dim=1)
        res[name] = {
            "loss_rel_err": (float(loss) - full) / full,
            "loss_rel_err_with_entropy": (loss_h - full) / full,
            "grad_cos_mean": float(cos.mean()),
            "grad_cos_p5": float(cos.quantile(0.05)),
            "grad_cos_batch": float(_cosine(g.flatten(), g_full.flatten(), dim=0)),
        }
    return res


def _cosine(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Cosine in float64 with no epsilon: the gradients are O(1 / numel), below F.cosine_similarity's eps=1e-8."""
    a, b = a.double(), b.double()
    return (a * b).sum(dim) / ((a * a).sum(dim) * (b * b).sum(dim)).sqrt()


def pitfalls(logits: torch.Tensor, k: int) -> list[dict]:
    """fp16 rounding of stored logits vs the exact tail mass; and storing fp16 log-probabilities instead."""
    v, i, lse = topk_targets(logits, k, TEMPS, half=False)
    out = []
    for ti, tau in enumerate(TEMPS):
        exact = 1.0 - torch.exp(v.double() / tau - lse[:, ti].double()[:, None]).sum(1)
        r16 = tail_mass(v.half(), i, lse[:, ti], tau).double()
        # alternative: store log p at tau 1 (values - lse_1) in fp16; logit = that + lse_1 in fp32
        lp = (v - lse[:, 0:1]).half().float() + lse[:, 0:1]
        rlp = tail_mass(lp, i, lse[:, ti], tau).double()
        out.append(
            {
                "K": k,
                "tau": tau,
                "exact_tail_min": float(exact.min()),
                "fp16_logits_max_abs_err": float((r16 - exact).abs().max()),
                "fp16_logits_rows_negative": int((r16 < 0).sum()),
                "fp16_logits_min": float(r16.min()),
                "fp16_logprob_max_abs_err": float((rlp - exact).abs().max()),
                "fp16_logprob_rows_negative": int((rlp < 0).sum()),
            }
        )
    return out


def run_teacher(name: str, logits: torch.Tensor, designs: list[Design], tmp: Path, seed: int, fid_rows: int) -> dict:
    """Bytes on all rows of ``logits``; tail mass, KL, loss and gradients on the first ``fid_rows``."""
    t_teacher = time.perf_counter()
    logits = logits.float()
    n, c = logits.shape
    nf = min(n, fid_rows)
    g = torch.Generator().manual_seed(seed)
    sub = logits[:nf]
    students = {"near": sub + torch.randn(nf, c, generator=g), "N(0,1)": torch.randn(nf, c, generator=g)}
    refs = [reference(sub, students, tau) for tau in TEMPS]
    p_tau = [r.p.double() for r in refs]
    # bytes of the teacher entropy per tau (the "+H" option), fp32 [n, T]
    ent_bytes = disk_bytes({"entropy": torch.stack([r.entropy for r in refs], 1).numpy()}, tmp)["entropy"]
    top: dict[int, tuple] = {}
    rows = []
    for d in designs:
        t0 = time.perf_counter()
        full = encode(d, logits, top)
        arrays = full.arrays(c)
        disk = disk_bytes(arrays, tmp)
        kept = (full.indices >= 0).sum(1).double()
        st = Stored(full.values[:nf], full.indices[:nf], full.lse[:nf], {k: v[:nf] for k, v in full.extra.items()})
        row = {
            "teacher": name,
            "design": d.name,
            "kind": d.kind,
            "K_or_Kmax": d.k,
            "target": d.target,
            "kmin": d.kmin,
            "tail_bits": d.bits,
            "tail_sizes": list(d.sizes),
            "logp16": d.logp16,
            "num_classes": c,
            "n_bytes": n,
            "n_fidelity": nf,
            "k_mean": float(kept.mean()),
            "k_p95": float(kept.quantile(0.95)),
            "bytes_disk": sum(disk.values()),
            "bytes_disk_arrays": disk,
            "bytes_raw": sum(a.nbytes for a in arrays.values()) / n,
            "entropy_store_bytes_disk": ent_bytes,
            "entropy_store_bytes_raw": 4 * len(TEMPS),
            "taus": {},
        }
        valid = st.indices >= 0
        for ti, tau in enumerate(TEMPS):
            r = tail_mass(st.values, st.indices, st.lse[:, ti], tau).double()
            exact = 1.0 - torch.where(valid, p_tau[ti].gather(1, st.indices.clamp_min(0).long()), 0.0).sum(1)
            q = rebuild(st, ti, tau, c, d.bits)
            if d.kind == "fixed":  # the project's rebuild must give the same target
                q_pipe = soft_target_probs(st.values, st.indices, st.lse[:, ti], tau, c)
                assert torch.allclose(q, q_pipe, atol=1e-7), (
                    "rebuild differs from pipeline.models.losses.soft_target_probs"
                )
            row["taus"][str(tau)] = {
                "tail_mean": float(r.mean()),
                "tail_p50": float(r.quantile(0.5)),
                "tail_p95": float(r.quantile(0.95)),
                "tail_min": float(r.min()),
                "tail_rows_negative": int((r < 0).sum()),
                "tail_max_abs_err_vs_exact": float((r - exact).abs().max()),
                **fidelity(refs[ti], q),
            }
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(f"  {name:>10} {d.name:<18} {row['wall_s']:6.2f}s", file=sys.stderr, flush=True)
    p1 = refs[0].p
    info = {
        "teacher": name,
        "num_classes": c,
        "n_bytes": n,
        "n_fidelity": nf,
        "top1_prob_tau1": float(p1.max(1).values.mean()),
        "entropy_tau1": float(refs[0].entropy.mean()),
        "entropy_tau3": float(refs[-1].entropy.mean()),
        "pitfalls": pitfalls(logits, min(10, c - 1)),  # all rows
    }
    info["wall_s"] = round(time.perf_counter() - t_teacher, 1)
    print(f"  {name}: {info['wall_s']} s", file=sys.stderr, flush=True)
    return {"info": info, "rows": rows}


# -- tables ----------------------------------------------------------------------------------------
HEAD = [
    "design",
    "k mean",
    "B disk",
    "B raw",
    "tail mean",
    "p50",
    "p95",
    "KL",
    "err near",
    "err N01",
    "cos near",
    "p5",
    "batch",
    "cos N01",
    "p5",
    "batch",
]


def tables(res: dict) -> list[str]:
    out = []
    for t in res["teachers"]:
        info = t["info"]
        out.append(
            f"\n### {info['teacher']} ({info['num_classes']} classes; bytes on {info['n_bytes']} rows, the rest on "
            f"{info['n_fidelity']}; "
            f"top-1 prob {info['top1_prob_tau1']:.3f} at tau 1, entropy {info['entropy_tau1']:.2f} / "
            f"{info['entropy_tau3']:.2f} nats at tau 1 / 3)"
        )
        for tau in TEMPS:
            rows = []
            for r in t["rows"]:
                x = r["taus"][str(tau)]
                nr, rn = x["near"], x["N(0,1)"]
                rows.append(
                    [
                        r["design"],
                        r["k_mean"],
                        round(r["bytes_disk"], 1),
                        round(r["bytes_raw"], 1),
                        x["tail_mean"],
                        x["tail_p50"],
                        x["tail_p95"],
                        x["kl_mean"],
                        f"{100 * nr['loss_rel_err']:+.2f}%",
                        f"{100 * rn['loss_rel_err']:+.2f}%",
                        nr["grad_cos_mean"],
                        nr["grad_cos_p5"],
                        nr["grad_cos_batch"],
                        rn["grad_cos_mean"],
                        rn["grad_cos_p5"],
                        rn["grad_cos_batch"],
                    ]
                )
            out.append(f"\ntau {tau:g}\n")
            out.append(md_table(HEAD, rows))
        pit = info["pitfalls"]
        out.append("\nfp16 pitfall (fixed K = {}):".format(pit[0]["K"]))
        out.append(
            md_table(
                ["tau", "exact min", "fp16 logits max|err|", "rows < 0", "min", "fp16 log-prob max|err|", "rows < 0"],
                [
                    [
                        p["tau"],
                        p["exact_tail_min"],
                        p["fp16_logits_max_abs_err"],
                        p["fp16_logits_rows_negative"],
                        p["fp16_logits_min"],
                        p["fp16_logprob_max_abs_err"],
                        p["fp16_logprob_rows_negative"],
                    ]
                    for p in pit
                ],
            )
        )
    return out


SUMMARY_DESIGNS = (
    "K=10",
    "K=100",
    "mass 0.9/64/5",
    "K=10 logp16",
    "K=10+tail 1b[64]",
    "K=10+tail 2b[16,48,160] logp16",
    "K=10+tail 3b[8..256]",
)


def summary(res: dict) -> list[str]:
    """A few designs side by side on every teacher: bytes, and the errors at each tau."""
    rows = []
    for t in res["teachers"]:
        for r in t["rows"]:
            if r["design"] not in SUMMARY_DESIGNS:
                continue
            row = [t["info"]["teacher"], r["design"], r["k_mean"], round(r["bytes_disk"], 1), round(r["bytes_raw"])]
            for tau in TEMPS:
                x = r["taus"][str(tau)]
                row += [
                    x["kl_mean"],
                    f"{100 * x['N(0,1)']['loss_rel_err']:+.1f}%",
                    f"{100 * x['near']['loss_rel_err']:+.1f}%",
                    x["N(0,1)"]["grad_cos_batch"],
                    x["near"]["grad_cos_batch"],
                    x["near"]["grad_cos_p5"],
                ]
            rows.append(row)
    head = ["teacher", "design", "k mean", "B disk", "B raw"]
    for tau in TEMPS:
        head += [f"KL t{tau:g}", "err N01", "err near", "cos N01 batch", "cos near batch", "cos near p5"]
    return ["\n## Summary (tau 1 then tau 3)\n", md_table(head, rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10000, help="rows (sample-views) per synthetic teacher")
    ap.add_argument("--fidelity-rows", type=int, default=2000, help="rows for tail mass, KL, loss and gradients")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="500 rows, 4 designs: a seconds-long smoke run")
    ap.add_argument("--digits", action="store_true", help="also train a digits teacher here (minutes)")
    ap.add_argument("--digits-epochs", type=int, default=15, help="15: top-1 prob ~0.6 on train views, ~2 min here")
    ap.add_argument("--digits-views", type=int, default=4)
    ap.add_argument("--digits-shards", type=int, default=2, help="digits shards (300 samples each) to score")
    ap.add_argument("--teachers", nargs="+", default=None, help="subset of teacher names to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "soft_targets.json"))
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    n = 500 if args.quick else args.rows
    nf = min(n, args.fidelity_rows)
    c = args.classes
    s = args.seed
    teachers = {
        "gauss-s2": lambda: gaussian_teacher(n, c, 2.0, s + 1),
        "gauss-s4": lambda: gaussian_teacher(n, c, 4.0, s + 2),
        "gauss-s8": lambda: gaussian_teacher(n, c, 8.0, s + 3),
        "peaked": lambda: synthetic_logits(n, c, s + 4),
        "mixup": lambda: mixup_teacher(n, c, s + 5),
    }
    if args.teachers:
        teachers = {k: v for k, v in teachers.items() if k in args.teachers}
    notes = {name: "synthetic (not a network)" for name in teachers}
    t_start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="stillroom-soft-") as d:
        tmp = Path(d)
        for name, make in teachers.items():
            results.append(run_teacher(name, make(), designs_for(c, args.quick), tmp, s + 100, nf))
        if args.digits:
            t0 = time.perf_counter()
            logits, how = digits_teacher(args.digits_epochs, args.digits_views, args.digits_shards)
            notes["digits"] = f"trained (regnety_002, {how}); teacher + logits took {time.perf_counter() - t0:.0f} s"
            results.append(run_teacher("digits", logits, designs_for(logits.shape[1], args.quick), tmp, s + 200, nf))
    doc = {"teachers": results}
    wall = time.perf_counter() - t_start
    out = write_result(
        args.out,
        "soft_targets",
        doc,
        settings={
            "temperatures": TEMPS,
            "rows_bytes": n,
            "rows_fidelity": nf,
            "classes": c,
            "chunk": [VIEWS, ROWS_PER_CHUNK, "columns"],
            "codec": "ZstdCodec(level=0, checksum=True)",
            "students": {"near": "teacher + N(0, 1)", "N(0,1)": "N(0, 1)"},
            "quick": args.quick,
        },
        teacher_notes=notes,
        wall_s=round(wall, 1),
        note=args.note,
    )
    print("\n".join(tables(out["results"]) + summary(out["results"])))
    print(f"\nwrote {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
