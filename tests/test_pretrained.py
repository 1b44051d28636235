"""Pretrained teachers by name (``--teacher NAME --teacher-pretrained``), with no network.

timm's pretrained weights are found the way ``timm.create_model(NAME, pretrained=True)`` finds them: here
from a Hugging Face hub cache made in the test (the layout huggingface_hub writes: ``models--timm--<name>/
refs/main`` and ``snapshots/<revision>/model.safetensors``), read offline (``HF_HUB_OFFLINE``). The
weights are the session's tiny digits teacher with its classifier widened to timm's 1000 ImageNet classes
(the 990 extra rows can never win), so the cached targets mean something.

Checked: the cache records the SHA-256 of the very file timm loaded (its targets equal those of a cache made
with ``--teacher-checkpoint`` on that file); an offline machine without the weights gets one ``error:``
line; phase 2's live teacher and ``verify-cache`` find the weights again by name and compare digests; a
class count that is not the weights' is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import ROOT, child_env, stillroom_cmd, student_config, tiny_cache_config
from safetensors.torch import save_file

from pipeline.cache import PER_SHARD, PER_VIEW, open_cache
from pipeline.config import checked
from pipeline.errors import CheckpointError, ConfigError
from pipeline.inspection.verify import verify
from pipeline.models.teacher import load_teacher, teacher_weights
from pipeline.options import VerifyConfig
from pipeline.phase1.cache_teacher import run
from pipeline.phase2.inputs import RunData
from pipeline.phase2.run_models import live_teachers
from pipeline.phase2.train import train
from pipeline.train_options import TrainConfig
from pipeline.views.recipe import make_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "regnetx_002"  # timm's default tag for it: pycls_in1k, hub repo timm/regnetx_002.pycls_in1k
FULL = "regnetx_002.pycls_in1k"
REPO = "models--timm--regnetx_002.pycls_in1k"
CLASSES = 1000


def imagenet_head(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 10-class regnetx_002 state dict widened to 1000 classes (the new rows lose to the 10 real ones)."""
    out = {k: v.clone().contiguous() for k, v in sd.items()}
    weight, bias = out["head.fc.weight"], out["head.fc.bias"]
    out["head.fc.weight"] = torch.cat([weight, torch.zeros(CLASSES - weight.shape[0], weight.shape[1])])
    out["head.fc.bias"] = torch.cat([bias, torch.full((CLASSES - bias.shape[0],), -30.0)])
    return out


def shifted(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Other bytes, the same predictions (every logit one lower): only the digest can tell them apart."""
    return {**sd, "head.fc.bias": sd["head.fc.bias"] - 1.0}


def write_hub(root: Path, sd: dict[str, torch.Tensor], revision: str = "a" * 40) -> Path:
    """A Hugging Face hub cache holding ``sd`` as timm's pretrained weights of ``FULL`` (refs/main -> revision)."""
    snapshot = root / REPO / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / REPO / "refs").mkdir(parents=True, exist_ok=True)
    (root / REPO / "refs" / "main").write_text(revision)
    save_file(sd, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


@pytest.fixture(scope="module")
def weights_sd(tiny_teacher: str) -> dict[str, torch.Tensor]:
    return imagenet_head(torch.load(tiny_teacher, weights_only=True))


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, weights_sd: dict[str, torch.Tensor]) -> Path:
    root = tmp_path_factory.mktemp("hf-hub")
    write_hub(root, weights_sd)
    return root


def offline(m: pytest.MonkeyPatch, hub: Path) -> None:
    """This process reads the hub cache ``hub`` offline (huggingface_hub reads the variables at import)."""
    from huggingface_hub import constants

    m.setattr(constants, "HF_HUB_CACHE", str(hub))
    m.setattr(constants, "HF_HUB_OFFLINE", True)


def hub_file(hub: Path) -> Path:
    return next((hub / REPO / "snapshots").glob("*/model.safetensors"))


@pytest.fixture(scope="module")
def pretrained_cache(tmp_path_factory: pytest.TempPathFactory, digits_shards: str, hub: Path) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "cache.zarr"
    with pytest.MonkeyPatch.context() as m:
        offline(m, hub)
        run(_cfg(digits_shards, None, out, teacher_pretrained=True))
    return out


def _cfg(shards: str, checkpoint: str | None, out: Path, **kw):
    base = {"teacher": NAME, "num_classes": CLASSES, "views": 2, "view_block": 1, "batch_size": 64}
    return tiny_cache_config(shards, checkpoint, out, **{**base, **kw})


def test_pretrained_teacher_records_the_digest_of_the_file_timm_loaded(
    pretrained_cache: Path, hub: Path, digits_shards: str, tmp_path: Path
) -> None:
    teacher = open_cache(str(pretrained_cache)).meta.teacher
    assert teacher["checkpoint_sha256"] == hashlib.sha256(hub_file(hub).read_bytes()).hexdigest()
    assert teacher["pretrained"] == FULL and teacher["name"] == NAME
    assert teacher["kwargs"] == {}, "the machine's hub path is not part of the teacher's identity"
    # The same file given as a checkpoint: the same digest, and the very same targets.
    by_file = tmp_path / "by-file.zarr"
    run(_cfg(digits_shards, str(hub_file(hub)), by_file))
    other = open_cache(str(by_file)).meta.teacher
    assert other["checkpoint_sha256"] == teacher["checkpoint_sha256"] and "pretrained" not in other
    a, b = zarr.open_group(str(pretrained_cache), mode="r"), zarr.open_group(str(by_file), mode="r")
    for name in (*PER_VIEW, *PER_SHARD):  # not the markers: their checksums bind each cache's own identity
        assert np.array_equal(np.asarray(a[name][...]), np.asarray(b[name][...])), name
    top1 = np.asarray(a["indices"][..., 0])
    assert top1[top1 >= 0].max() < 10, "the widened classifier's extra classes never win"


def test_offline_without_the_weights_is_one_error_line(tmp_path: Path, digits_shards: str) -> None:
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    args = ["cache-teacher", "--shards", digits_shards, "--out", str(tmp_path / "c.zarr"), "--teacher", NAME]
    proc = subprocess.run(
        [*stillroom_cmd(), *args, "--teacher-pretrained", "--num-classes", "1000", "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(empty)),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for words in (FULL, "HF_HUB_OFFLINE", "--teacher-checkpoint", str(empty), "timm/regnetx_002.pycls_in1k"):
        assert words in errors[0], errors[0]
    assert not (tmp_path / "c.zarr").exists(), "nothing is created before the teacher's weights are found"


def test_another_class_count_than_the_weights_is_refused(tmp_path: Path, digits_shards: str, hub: Path) -> None:
    with pytest.MonkeyPatch.context() as m, pytest.raises(ConfigError, match=r"classify 1000 classes.* has 10"):
        offline(m, hub)
        run(_cfg(digits_shards, None, tmp_path / "c.zarr", teacher_pretrained=True, num_classes=None))
    with pytest.raises(ConfigError, match="give one source of teacher weights"):
        run(_cfg(digits_shards, "x.pth", tmp_path / "c.zarr", teacher_pretrained=True))


def test_timm_overlay_file_through_teacher_kwargs(hub: Path, weights_sd: dict[str, torch.Tensor]) -> None:
    """``--teacher-kwargs '{pretrained_cfg_overlay: {file: F}}'`` is timm's own way to name the file: honoured."""
    path = str(hub_file(hub))
    kwargs = {"pretrained_cfg_overlay": {"file": path}}
    weights = teacher_weights(NAME, None, True, kwargs)
    assert (weights.path, weights.pretrained, weights.num_classes) == (path, FULL, CLASSES)
    model, built = load_teacher(NAME, CLASSES, weights, torch.device("cpu"), kwargs)
    assert built["checkpoint_sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in weights_sd.items())


def test_verify_cache_finds_the_pretrained_weights_by_name(
    pretrained_cache: Path, digits_shards: str, hub: Path, weights_sd: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    cfg = VerifyConfig(cache=str(pretrained_cache), shards=[digits_shards], samples=8)
    with pytest.MonkeyPatch.context() as m:
        offline(m, hub)
        report = verify(cfg)
    assert report["ok"] and report["top1_agreement"] == 1.0, report
    # The hub's copy changed since the cache was made: named, not silently used.
    changed = tmp_path / "hub"
    write_hub(changed, shifted(weights_sd), revision="b" * 40)
    with pytest.MonkeyPatch.context() as m:
        offline(m, changed)
        report = verify(cfg)
    assert not report["ok"] and any(f"weights {FULL}" in p and "not the teacher" in p for p in report["problems"])


def test_live_teacher_loads_the_pretrained_weights_the_cache_says(
    pretrained_cache: Path, digits_shards: str, hub: Path, weights_sd: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Live mode needs no --teacher-checkpoint for a pretrained cache; the first step's loss equals the cached one."""
    kw = {"epochs": 1, "max_steps_per_epoch": 1, "distillation": "hard", "eval_every": 0}
    losses = {}
    with pytest.MonkeyPatch.context() as m:
        offline(m, hub)
        for mode in ("cached", "live"):
            cfg = student_config(digits_shards, str(pretrained_cache), tmp_path / mode, teacher_mode=mode, **kw)
            train(cfg)
            lines = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
            losses[mode] = next(x for x in lines if x["event"] == "train")["loss"]
    assert losses["cached"] == losses["live"]
    changed = tmp_path / "hub"
    write_hub(changed, shifted(weights_sd), revision="b" * 40)
    with pytest.MonkeyPatch.context() as m, pytest.raises(CheckpointError, match="is not the teacher of cache"):
        offline(m, changed)
        train(student_config(digits_shards, str(pretrained_cache), tmp_path / "other", teacher_mode="live", **kw))


def test_live_teacher_by_name_without_a_cache(hub: Path, weights_sd: dict[str, torch.Tensor]) -> None:
    """``--teacher-mode live --teacher NAME --teacher-pretrained``: no cache, no checkpoint."""
    cfg = checked(TrainConfig(shards=["x.tar"], teacher_mode="live", teacher=[NAME], teacher_pretrained=True))
    data = RunData([], [], make_recipe("deit", 32), 0, CLASSES, [], [], [1.0], 1, None)
    with pytest.MonkeyPatch.context() as m:
        offline(m, hub)
        (teacher,) = live_teachers(cfg, data, torch.device("cpu"))
    assert all(torch.equal(teacher.net.state_dict()[k], v) for k, v in weights_sd.items())
    with pytest.raises(ConfigError, match="give one source of teacher weights"):
        checked(dataclasses.replace(cfg, teacher_checkpoint=["t.pth"]))
    with pytest.raises(ConfigError, match="needs --teacher NAME and --teacher-checkpoint or --teacher-pretrained"):
        checked(dataclasses.replace(cfg, teacher_pretrained=False))


def no_network(m: pytest.MonkeyPatch, hub: Path) -> None:
    """No HF_HUB_OFFLINE, and a hub endpoint nothing answers (a closed local port refuses at once; huggingface_hub
    retried such a connection for ~25 s per file before it said so)."""
    from huggingface_hub import constants

    m.setattr(constants, "HF_HUB_CACHE", str(hub))
    m.setattr(constants, "HF_HUB_OFFLINE", False)
    m.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def test_no_network_without_hf_hub_offline_is_one_line_at_once(tmp_path: Path) -> None:
    """Issue 26, item 11: the right line came after 54 s of retries."""
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    with pytest.MonkeyPatch.context() as m:
        no_network(m, empty)
        start = time.perf_counter()
        with pytest.raises(CheckpointError) as caught:
            teacher_weights(NAME, None, True)
        took = time.perf_counter() - start
    assert took < 10, f"{took:.1f} s before the error"
    message = str(caught.value)
    for words in (FULL, "http://127.0.0.1:9 cannot be reached", str(empty), "--teacher-checkpoint"):
        assert words in message, message
    assert "\n" not in message


def test_no_network_with_the_weights_cached_reads_them_at_once(hub: Path) -> None:
    with pytest.MonkeyPatch.context() as m:
        no_network(m, hub)
        start = time.perf_counter()
        weights = teacher_weights(NAME, None, True)
        took = time.perf_counter() - start
    assert weights.path == str(hub_file(hub)) and took < 10, f"{took:.1f} s"


def test_a_reachable_hub_is_asked_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe only tells an unreachable endpoint: any answer (here a 404 from a local server) means online."""
    import http.server
    import threading

    from huggingface_hub import constants

    from pipeline.models.teacher import hub_unreachable

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_unreachable() is None
    finally:
        server.shutdown()
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert hub_unreachable() is not None
