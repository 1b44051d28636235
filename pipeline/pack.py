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
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from .config import finish
from .errors import DataError
from .options import PackConfig
from .seeding import hash64

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


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


def folder_items(root: str) -> tuple[list[str], Iterator[Item]]:
    """ImageFolder tree, or a flat folder labelled by ``classes.tsv`` synset prefixes."""
    if not os.path.isdir(root):
        raise DataError(
            f"{root!r} is not a folder (expected 'digits', an ImageFolder root or a folder with classes.tsv)"
        )
    tsv = os.path.join(root, "classes.tsv")
    if os.path.exists(tsv):
        synsets = []
        with open(tsv) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 2 and parts[0].strip().isdigit():
                    synsets.append((int(parts[0]), parts[1]))
        synsets.sort()
        classes = [s for _, s in synsets]
    else:
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    index = {c: i for i, c in enumerate(classes)}
    files: list[tuple[str, int]] = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            top = rel.split(os.sep)[0] if os.sep in rel else None
            cls = top if top in index else name.split("_")[0]
            if cls not in index:
                raise DataError(
                    f"{os.path.join(root, rel)}: cannot tell its class (not under a class folder "
                    f"and no synset prefix from classes.tsv)"
                )
            files.append((rel, index[cls]))
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    files.sort()

    def gen() -> Iterator[Item]:
        for rel, label in files:
            ext = os.path.splitext(rel)[1].lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            yield Item(key=_safe_key(rel), label=label, ext=ext, load=partial(_read_file, os.path.join(root, rel)))

    return classes, gen()


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_split(items: list[Item], out: str, prefix: str, per_shard: int, classes: list[str]) -> dict:
    os.makedirs(out, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(items), per_shard)):
        chunk = items[start : start + per_shard]
        name = f"{prefix}-{s:06d}.tar"
        tmp = os.path.join(out, name + ".tmp")
        with wds.TarWriter(tmp, mtime=0.0) as sink:  # fixed mtime: repacking gives identical bytes
            for it in chunk:
                sink.write({"__key__": it.key, it.ext: it.data, "cls": str(it.label).encode()})
        os.replace(tmp, os.path.join(out, name))
        shards.append({"name": name, "count": len(chunk), "class_counts": dict(Counter(it.label for it in chunk))})
    # Shards of this prefix left by an earlier, larger pack into the same folder would be picked up by
    # a glob (``train-*.tar``) and silently mixed into the data set: they belong to this split, remove them.
    numbered = re.compile(re.escape(prefix) + r"-(\d{6})\.tar")
    for old in os.listdir(out):
        m = numbered.fullmatch(old)
        if m and int(m.group(1)) >= len(shards):
            os.remove(os.path.join(out, old))
    meta = {
        "split": prefix,
        "classes": classes,
        "num_classes": len(classes),
        "num_samples": len(items),
        "per_shard": per_shard,
        "shards": shards,
        "pattern": f"{prefix}-{{000000..{len(shards) - 1:06d}}}.tar" if shards else None,
    }
    with open(os.path.join(out, prefix + ".json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def pack(source: str, out: str, **options: Any) -> dict[str, dict]:
    """Pack ``source`` into ``out/<prefix>-NNNNNN.tar`` (and ``val-NNNNNN.tar``) plus sidecars.

    Args:
        source, out, options: The fields of :class:`~pipeline.options.PackConfig`.

    Returns:
        The sidecar metadata of each split written, by split name.
    """
    cfg = finish(PackConfig(source=source, out=out, **options))
    classes, items_iter = digits_items(cfg.digits_size) if source == "digits" else folder_items(source)
    items = list(items_iter)
    dup = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if dup:
        raise DataError(f"{source}: two files map to the key {dup[0]!r}; rename one")
    items.sort(key=lambda it: (_hash01("order:" + it.key), it.key))
    val = [it for it in items if _hash01("split:" + it.key) < cfg.val_fraction]
    train = [it for it in items if _hash01("split:" + it.key) >= cfg.val_fraction]
    result = {cfg.prefix: _write_split(train, out, cfg.prefix, cfg.per_shard, classes)}
    if cfg.val_fraction > 0:
        result["val"] = _write_split(val, out, "val", cfg.per_shard, classes)
    return result
