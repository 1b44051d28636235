"""Phase 2 never trains a copy on pixels other than those its targets were computed on
(issue: nothing wrong passes silently, round two).

* A sample readable when the cache was made but unreadable now takes its mixing partner's copies out
  with it (counted by reason), instead of training the partner unmixed under targets cached for the
  mixed view; cached and live training stay bit-identical under ``--on-error skip``.
* An environment that replays other pixels (a decoder one level off, as another libjpeg build or CPU
  path would be, with equal library versions) is refused by train-student and failed by verify-cache.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import break_one_image, student_config, tiny_cache_config
from PIL import Image

import pipeline.shards.decode
from pipeline.errors import CacheError
from pipeline.inspection.verify import verify
from pipeline.options import VerifyConfig
from pipeline.phase1.cache_teacher import run as cache_teacher
from pipeline.phase2.train import train
from pipeline.views.mixing import partners

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(digits_shards: str, tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("pixels") / "cache.zarr"
    cache_teacher(tiny_cache_config(digits_shards, tiny_teacher, out, views=2, view_block=1))
    return str(out)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pth", weights_only=True)["model"]


def test_an_unreadable_sample_takes_its_partners_copies_out_and_cached_equals_live(
    cache: str, digits_shards: str, tiny_teacher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards, broken = break_one_image(digits_shards, tmp_path / "shards")
    base = student_config(shards, cache, tmp_path / "cached", on_error="skip", epochs=2)
    for mode in ("cached", "live"):
        cfg = dataclasses.replace(base, out=str(tmp_path / mode), teacher_mode=mode)
        if mode == "live":
            cfg = dataclasses.replace(cfg, teacher_checkpoint=[tiny_teacher])
        monkeypatch.setenv("STILLROOM_DEBUG_DIR", str(tmp_path / f"trace-{mode}"))
        train(cfg)
    a, b = weights(tmp_path / "cached"), weights(tmp_path / "live")
    assert all(torch.equal(a[k], b[k]) for k in a), "cached and live training differ under --on-error skip"
    lines = [json.loads(x) for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    for e in (x for x in lines if x["event"] == "epoch"):
        skipped = e["copies"]["skipped"]
        # the broken sample, and its partner (read when the cache was made, mixed with it there)
        assert skipped == {
            "sample unreadable": 1,
            "mixing partner unreadable (both were read when the cache was made)": 1,
        }
        assert e["copies"]["filled"] == 2
    # the partner of the broken sample in each epoch's view is never trained in that epoch
    position = int(broken.removeprefix("digits-")) - 40  # shard 1 holds digits 40..79 in order
    for view in (0, 1):
        (pair,) = [p for p in partners(0, view, "train-000001.tar", 40, 1, range(40)) if position in p]
        assert None not in pair


def test_a_decoder_one_level_off_is_refused_by_training_and_verification(
    cache: str, digits_shards: str, tiny_teacher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pipeline.shards.decode.decode_image

    def one_level_up(data: bytes) -> Image.Image:
        return Image.fromarray(np.minimum(np.asarray(real(data)).astype(np.int16) + 1, 255).astype(np.uint8))

    monkeypatch.setattr(pipeline.shards.decode, "decode_image", one_level_up)
    cfg = student_config(digits_shards, cache, tmp_path / "run", epochs=1)
    with pytest.raises(CacheError, match=r"replays other pixels than the cache's teacher saw .* versions are equal"):
        train(cfg)
    report = verify(VerifyConfig(cache=cache, shards=[digits_shards], teacher_checkpoint=tiny_teacher, samples=16))
    assert (
        not report["ok"] and report["pixel_mismatches"] > 0 and report["pixel_mismatches"] == report["pixels_checked"]
    )
    assert any("replays other pixels" in p for p in report["problems"])
    monkeypatch.undo()
    good = verify(VerifyConfig(cache=cache, shards=[digits_shards], teacher_checkpoint=tiny_teacher, samples=16))
    assert good["ok"] and good["pixels_checked"] > 0 and good["pixel_mismatches"] == 0


def test_a_decoder_that_changes_one_image_is_caught_by_training_and_verification(
    cache: str, digits_shards: str, tiny_teacher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 26, item 4: +1 on ONE image (equal versions) trained with status 0 and verify-cache said ok, as most
    images of a few-view cache were never digest-checked. The checked rows now rotate with the view, so every
    image is checked in one of its views: a run over every view, and verify-cache by default, catch it."""
    # Position 30 of shard 2: neither it nor its mixing partners were on a checked row of views 0 and 1 under
    # format 3's rule (1 row in 16 at random per view); format 4 checks it in one of the two.
    with tarfile.open(Path(digits_shards).parent / "train-000002.tar") as t:
        member = [m for m in t.getmembers() if m.name.endswith(".png")][30]
        target = t.extractfile(member).read()
    real = pipeline.shards.decode.decode_image

    def one_image_up(data: bytes) -> Image.Image:
        img = real(data)
        if data != target:
            return img
        return Image.fromarray(np.minimum(np.asarray(img).astype(np.int16) + 1, 255).astype(np.uint8))

    monkeypatch.setattr(pipeline.shards.decode, "decode_image", one_image_up)
    with pytest.raises(CacheError, match=r"replays other pixels than the cache's teacher saw"):
        train(student_config(digits_shards, cache, tmp_path / "run", epochs=2))  # every view of the cache
    report = verify(VerifyConfig(cache=cache, shards=[digits_shards], teacher_checkpoint=tiny_teacher))
    assert not report["ok"] and 1 <= report["pixel_mismatches"] <= 2, report  # the image, and its mixing partner
    assert report["pixels_checked"] == 120 and report["images_pixels_unchecked"] == 0
    monkeypatch.undo()
    good = verify(VerifyConfig(cache=cache, shards=[digits_shards], teacher_checkpoint=tiny_teacher))
    assert good["ok"] and good["pixels_checked"] == 120 and good["shards_checked"] == 3, good
