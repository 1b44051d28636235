"""Pack image data sets into webdataset shards with a JSON sidecar.

Sources:
    * ``digits``: scikit-learn's handwritten digits (real data, shipped with the package),
      upscaled and written as RGB PNGs.
    * an ImageFolder tree ``root/<class>/<image>``.
    * a flat folder with ``classes.tsv`` (index, synset, name) whose file names start with the
      synset (``n01440764_tench.JPEG``), the layout of small ImageNet samples.

Keys derive from the relative path (never random), and the order of samples is a stable hash
order, so shards mix classes (mixup partners are drawn inside a shard) and repacking the same
source gives the same shards.

JPEG, PNG and WebP files are stored byte for byte. BMP, TIFF and GIF files are re-encoded losslessly
as PNG (a GIF's first frame; a mode PNG cannot hold, such as CMYK or a float TIFF, as the 8-bit RGB
that reading would give anyway). Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``)
are ignored, and every other file that is not packed is reported, in the return value, on the
command line and in the sidecar. The sidecar ``<prefix>.json`` is also a wids shard index
(``wids_version``, ``shardlist``), so ``--shards <prefix>.json`` starts without opening a tar.

A pack writes over, or removes, only files that an earlier pack in the same folder wrote (its sidecar lists
them): another tool's shards, and another split's files, are never touched, and files of the earlier pack
that a re-pack does not write again are removed only with ``--replace`` (:func:`_plan`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import checked
from pipeline.errors import DataError
from pipeline.files import writable_folder
from pipeline.options import PackConfig
from pipeline.seeding import hash64
from pipeline.shards.decode import decode_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
REENCODED_SUFFIXES = (".bmp", ".tif", ".tiff", ".gif")  # stored as lossless PNG
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")  # modes PNG holds as they are


@dataclass
class Item:
    """One sample to pack; ``load`` returns its bytes only when the shard is written, so packing
    a large folder holds keys and labels in memory, not images."""

    key: str
    label: int
    ext: str
    load: Callable[[], bytes]

    @property
    def data(self) -> bytes:
        return self.load()


def _hash01(key: str) -> float:
    return hash64(key) / 2**64


def _safe_key(rel: str) -> str:
    """A webdataset key from a relative path: no dots (they split extensions), no slashes."""
    stem = os.path.splitext(rel)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem.replace(os.sep, "--"))


def digits_items(size: int = 32) -> tuple[list[str], Iterator[Item]]:
    """scikit-learn digits (1797 real 8x8 scans), upscaled to ``size`` px RGB PNGs."""
    from sklearn.datasets import load_digits

    data = load_digits()
    classes = [str(i) for i in range(10)]

    def gen() -> Iterator[Item]:
        for i, (img, label) in enumerate(zip(data.images, data.target, strict=True)):
            arr = (img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            pil = Image.fromarray(arr, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            buf = io.BytesIO()
            pil.save(buf, format="PNG")
            png = buf.getvalue()
            yield Item(key=f"digits-{i:05d}", label=int(label), ext="png", load=lambda png=png: png)

    return classes, gen()


@dataclass
class Skipped:
    """Files of the source that are not packed, by reason (reported, never silent)."""

    files: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, rel: str) -> None:
        self.files.setdefault(reason, []).append(rel)

    def summary(self, examples: int = 3) -> list[dict[str, Any]]:
        """``[{reason, count, examples}]``, as the sidecar records it and the CLI prints it."""
        return [
            {"reason": reason, "count": len(rels), "examples": sorted(rels)[:examples]}
            for reason, rels in sorted(self.files.items())
        ]


def _classes(root: str) -> list[str]:
    """Class names: ``classes.tsv``'s synsets by index, else the visible top-level folders."""
    tsv = os.path.join(root, "classes.tsv")
    if not os.path.exists(tsv):
        # A hidden folder (.ipynb_checkpoints) is not a class: as class 0 it would shift every label.
        return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    synsets = []
    with open(tsv) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2 and parts[0].strip().isdigit():
                synsets.append((int(parts[0]), parts[1]))
    synsets.sort()
    return [s for _, s in synsets]


def _walk(root: str, skipped: Skipped) -> Iterator[str]:
    """Relative paths of the image files under ``root``; hidden entries and other files are reported."""
    for dirpath, dirnames, names in os.walk(root):
        for d in [d for d in dirnames if d.startswith(".")]:
            skipped.add("hidden folder (ignored)", os.path.relpath(os.path.join(dirpath, d), root) + os.sep)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            suffix = os.path.splitext(name)[1].lower()
            if name.startswith("."):
                skipped.add("hidden file (ignored)", rel)
            elif rel == "classes.tsv":
                continue
            elif suffix in IMAGE_SUFFIXES + REENCODED_SUFFIXES:
                yield rel
            else:
                skipped.add(f"not an image ({suffix or 'no extension'})", rel)


def folder_items(root: str, skipped: Skipped | None = None) -> tuple[list[str], Iterator[Item]]:
    """ImageFolder tree, or a flat folder labelled by ``classes.tsv`` synset prefixes."""
    if not os.path.isdir(root):
        raise DataError(
            f"{root!r} is not a folder (expected 'digits', an ImageFolder root or a folder with classes.tsv)"
        )
    skipped = skipped if skipped is not None else Skipped()
    classes = _classes(root)
    index = {c: i for i, c in enumerate(classes)}
    files: list[tuple[str, int]] = []
    for rel in _walk(root, skipped):
        name = os.path.basename(rel)
        top = rel.split(os.sep)[0] if os.sep in rel else None
        cls = top if top in index else name.split("_")[0]
        if cls not in index:
            raise DataError(
                f"{os.path.join(root, rel)}: cannot tell its class (not under a class folder "
                f"and no synset prefix from classes.tsv)"
            )
        files.append((rel, index[cls]))
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES + REENCODED_SUFFIXES)}) found")
    files.sort()

    def gen() -> Iterator[Item]:
        for rel, label in files:
            path = os.path.join(root, rel)
            ext = os.path.splitext(rel)[1].lower().lstrip(".")
            if "." + ext in REENCODED_SUFFIXES:
                yield Item(key=_safe_key(rel), label=label, ext="png", load=partial(_reencode_png, path))
                continue
            ext = "jpg" if ext == "jpeg" else ext
            yield Item(key=_safe_key(rel), label=label, ext=ext, load=partial(_read_file, path))

    return classes, gen()


def _reencode_png(path: str) -> bytes:
    """A BMP/TIFF/GIF as lossless PNG: what :func:`decode_image` reads from it is unchanged."""
    data = _read_file(path)
    try:
        img = Image.open(io.BytesIO(data))
        img.seek(0)  # a GIF's (or multi-page TIFF's) first frame, as decode_image reads it
        img.load()
        if img.mode not in PNG_MODES:
            img = decode_image(data)  # CMYK, float, 32-bit...: the 8-bit RGB that reading gives
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    except Exception as e:  # PIL raises many types for a damaged or unsupported file
        raise DataError(f"{path}: cannot re-encode as PNG ({type(e).__name__}: {e})") from e
    return buf.getvalue()


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _numbered(out: str, split: str) -> list[str]:
    """The ``<split>-NNNNNN.tar`` files in ``out``: what a glob or brace pattern of the split picks up."""
    if not os.path.isdir(out):
        return []
    pattern = re.compile(re.escape(split) + r"-\d{6}\.tar")
    return sorted(name for name in os.listdir(out) if pattern.fullmatch(name))


def _earlier_pack(out: str, split: str) -> dict | None:
    """The sidecar an earlier pack of ``split`` left in ``out``; None when there is none, or when
    ``<split>.json`` is not a pack sidecar (another tool's file, never ours to replace)."""
    try:
        with open(os.path.join(out, split + ".json")) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("split", split) != split or not isinstance(doc.get("shards"), list):
        return None
    return doc


def _written_by(doc: dict | None, split: str) -> set[str]:
    """The files a pack of ``split`` wrote, as its sidecar lists them (those it was writing when stopped too)."""
    if doc is None:
        return set()
    names = {s["name"] for s in doc["shards"] if isinstance(s, dict) and isinstance(s.get("name"), str)}
    return names | {n for n in doc.get("writing", []) if isinstance(n, str)} | {split + ".json"}


@dataclass
class _Split:
    """One split a pack writes: its name, samples, shards, and the split whose --val-fraction it is."""

    name: str
    items: list[Item]
    per_shard: int
    val_of: str | None = None

    @property
    def files(self) -> list[str]:
        shards = -(-len(self.items) // self.per_shard)
        return [f"{self.name}-{s:06d}.tar" for s in range(shards)] + [self.name + ".json"]


def _plan(out: str, splits: list[_Split], replace: bool) -> list[str]:
    """Check what packing ``splits`` into ``out`` writes over and leaves behind; returns the files to remove.

    Only files an earlier pack in ``out`` wrote (its sidecar lists them) are ever written over or removed;
    a file of the split's name that no sidecar lists, or another split's files, stops the pack before
    anything is written. Files of the earlier pack that this one does not write again are removed only
    with ``replace`` (a glob of the split would otherwise mix them in).
    """
    foreign, removed = [], []
    for split in splits:
        doc = _earlier_pack(out, split.name)
        _same_kind(out, split, doc, replace)
        ours = _written_by(doc, split.name)
        present = [*_numbered(out, split.name), *([split.name + ".json"] if os.path.exists(_path(out, split)) else [])]
        foreign += [name for name in present if name not in ours]
        removed += [name for name in sorted(ours - set(split.files)) if os.path.exists(os.path.join(out, name))]
    train = splits[0]
    if len(splits) == 1 and train.name != "val":
        doc = _earlier_pack(out, "val")
        if doc is not None and doc.get("val_of") == train.name:  # its samples are in this pack's train split now
            removed += [n for n in sorted(_written_by(doc, "val")) if os.path.exists(os.path.join(out, n))]
    if foreign:
        raise DataError(
            f"{out} holds {_names(foreign)}, which no earlier pack in this folder wrote (no sidecar lists "
            f"{'it' if len(foreign) == 1 else 'them'}); pack never writes over or beside files it did not write: "
            "move them away, or pack into another folder"
        )
    if removed and not replace:
        raise DataError(
            f"packing into {out} would remove {_names(removed)} of its earlier pack (this pack does not write "
            "them again, and a glob of the split would mix them in); add --replace to remove them, or pack into "
            "another folder"
        )
    return removed


def _path(out: str, split: _Split) -> str:
    return os.path.join(out, split.name + ".json")


def _same_kind(out: str, split: _Split, doc: dict | None, replace: bool) -> None:
    """Refuse to write a split over another pack's split of that name: a --val-fraction split over one packed
    on its own (``--prefix val``) or over another split's, and the other way round."""
    if doc is None or doc.get("val_of", split.val_of) == split.val_of:
        return  # no earlier pack, the same kind, or an older sidecar of a split packed on its own
    if "val_of" not in doc and replace:
        return  # an older sidecar does not say: the user says it is this data set's --val-fraction split
    if doc.get("val_of"):
        whose = f"is the --val-fraction split of {doc['val_of']!r}"
    else:
        whose = "was packed on its own (--prefix)" if "val_of" in doc else "an older pack wrote (it does not say how)"
    how = "--val-fraction" if split.val_of else f"packing {split.name!r} on its own"
    hint = ", or add --replace if it is this data set's --val-fraction split" if "val_of" not in doc else ""
    raise DataError(
        f"{_path(out, split)}: {out} already holds a split {split.name!r} that {whose}; {how} would write over "
        f"it. Pack into another folder{hint}"
    )


def _names(files: list[str], shown: int = 5) -> str:
    more = f" and {len(files) - shown} more" if len(files) > shown else ""
    return ", ".join(files[:shown]) + more


def _mark_writing(out: str, split: _Split) -> None:
    """Before any shard is written, record in the sidecar the files this pack writes: a pack killed midway
    leaves only sidecar-listed files, which the next pack may write over."""
    doc = _earlier_pack(out, split.name) or {"split": split.name, "val_of": split.val_of, "shards": []}
    doc["writing"] = split.files
    tmp = _path(out, split) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, _path(out, split))


def _write_split(
    items: list[Item],
    out: str,
    prefix: str,
    per_shard: int,
    classes: list[str],
    skipped: Skipped | None = None,
    val_of: str | None = None,
) -> dict:
    from webdataset import TarWriter  # imports torch: only when shards are written

    os.makedirs(out, exist_ok=True)
    _mark_writing(out, _Split(prefix, items, per_shard, val_of))
    shards = []
    for s, start in enumerate(range(0, len(items), per_shard)):
        chunk = items[start : start + per_shard]
        name = f"{prefix}-{s:06d}.tar"
        tmp = os.path.join(out, name + ".tmp")
        with TarWriter(tmp, mtime=0.0) as sink:  # fixed mtime: repacking gives identical bytes
            for it in chunk:
                sink.write({"__key__": it.key, it.ext: it.data, "cls": str(it.label).encode()})
        os.replace(tmp, os.path.join(out, name))
        shards.append({"name": name, "count": len(chunk), "class_counts": dict(Counter(it.label for it in chunk))})
    meta = {
        # A wids shard index (webdataset's format) as well as the sidecar: --shards <prefix>.json gives the
        # shards and their counts without opening a tar; urls are relative to this file, as wids reads them.
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": prefix,
        "shardlist": [{"url": s["name"], "nsamples": s["count"]} for s in shards],
        "split": prefix,
        "val_of": val_of,  # the split whose --val-fraction this is (None: packed on its own)
        "classes": classes,
        "num_classes": len(classes),
        "num_samples": len(items),
        "per_shard": per_shard,
        "shards": shards,
        "pattern": f"{prefix}-{{000000..{len(shards) - 1:06d}}}.tar" if shards else None,
        "skipped": skipped.summary() if skipped else [],
    }
    tmp = os.path.join(out, prefix + ".json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out, prefix + ".json"))
    return meta


def pack(source: str, out: str, **options: Any) -> dict[str, dict]:
    """Pack ``source`` into ``out/<prefix>-NNNNNN.tar`` (and ``val-NNNNNN.tar``) plus sidecars.

    Args:
        source, out, options: The fields of :class:`~pipeline.options.PackConfig`.

    Returns:
        The sidecar metadata of each split written, by split name; each records under ``skipped``
        the source files that were not packed, and why.

    Raises:
        DataError: ``out`` holds files of the split's names that no earlier pack there wrote, or another
            pack's split, or (without ``replace``) files of its earlier pack that this one would remove;
            nothing is written then.
    """
    cfg = checked(PackConfig(source=source, out=out, **options))
    writable_folder(out, "--out")
    skipped = Skipped()
    classes, items_iter = digits_items(cfg.digits_size) if source == "digits" else folder_items(source, skipped)
    items = list(items_iter)
    dup = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if dup:
        raise DataError(f"{source}: two files map to the key {dup[0]!r}; rename one")
    items.sort(key=lambda it: (_hash01("order:" + it.key), it.key))
    val = [it for it in items if _hash01("split:" + it.key) < cfg.val_fraction]
    train = [it for it in items if _hash01("split:" + it.key) >= cfg.val_fraction]
    splits = [_Split(cfg.prefix, train, cfg.per_shard)]
    if cfg.val_fraction > 0:
        splits.append(_Split("val", val, cfg.per_shard, val_of=cfg.prefix))
    removed = _plan(out, splits, cfg.replace)  # every refusal before anything is written
    result = {s.name: _write_split(s.items, out, s.name, s.per_shard, classes, skipped, s.val_of) for s in splits}
    for name in removed:
        os.remove(os.path.join(out, name))
    if removed:
        log.warning("--replace: removed %d file(s) of the earlier pack in %s: %s", len(removed), out, _names(removed))
    return result
