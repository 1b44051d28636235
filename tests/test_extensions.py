"""The extension points docs/architecture.md describes, exercised: a teacher family that is not timm's
(a plugin registers it with timm), and a storage backend with its own faults (register_backend)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cache_cli_args, child_env, stillroom_cmd

from pipeline import storage
from pipeline.errors import ConfigError, StorageError
from pipeline.plugins import load_plugins

PLUGIN = '''
"""A teacher family outside timm: a two-layer CNN, registered with timm so --teacher can name it."""
import torch
from timm.models import register_model


class TinyCNN(torch.nn.Module):
    default_cfg = pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "classifier": "fc"}

    def __init__(self, num_classes=10, **kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@register_model
def tiny_plugin_cnn(pretrained=False, **kwargs):
    return TinyCNN(**kwargs)
'''


def test_a_plugin_teacher_family_caches_end_to_end(digits_shards: str, tmp_path: Path) -> None:
    (tmp_path / "my_teachers.py").write_text(textwrap.dedent(PLUGIN))
    sys.path.insert(0, str(tmp_path))
    try:
        load_plugins("my_teachers")
        import timm

        model = timm.create_model("tiny_plugin_cnn", num_classes=10)
    finally:
        sys.path.remove(str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "cnn.pth")
    args = cache_cli_args(digits_shards, str(tmp_path / "cnn.pth"), tmp_path / "c.zarr", teacher="tiny_plugin_cnn")
    env = child_env(STILLROOM_PLUGINS="my_teachers", PYTHONPATH=f"{ROOT}:{tmp_path}")
    proc = subprocess.run([*stillroom_cmd(), *args, "--views", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "units done" in proc.stdout
    missing = subprocess.run(
        [*stillroom_cmd(), *args],
        cwd=ROOT,
        env=child_env(STILLROOM_PLUGINS="nope_missing"),
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "cannot import plugin 'nope_missing'" in missing.stderr


def test_a_storage_backend_registers_its_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend's own exception type becomes one StorageError line naming the URL, as S3's do."""
    flaky = types.ModuleType("flakyfs")

    class EndpointDown(Exception):
        pass

    EndpointDown.__module__ = "flakyfs"
    from fsspec.implementations.memory import MemoryFileSystem

    class FlakyFileSystem(MemoryFileSystem):
        protocol = ("flaky",)

        def exists(self, path: str, **kwargs) -> bool:
            raise EndpointDown("no answer from flaky.example in 30 s")

    flaky.FlakyFileSystem = FlakyFileSystem
    monkeypatch.setitem(sys.modules, "flakyfs", flaky)
    monkeypatch.setattr(storage, "FAULT_MODULES", set(storage.FAULT_MODULES))
    storage.register_backend(("flaky",), FlakyFileSystem)
    with pytest.raises(EndpointDown):  # not declared a fault: it keeps its traceback, as a bug would
        storage.exists("flaky://bucket/shard.tar")
    storage.register_backend(("flaky",), FlakyFileSystem, fault_modules=("flakyfs",))
    with pytest.raises(
        StorageError, match=r"'flaky://bucket/shard\.tar': storage request failed \(EndpointDown: no answer"
    ):
        storage.exists("flaky://bucket/shard.tar")


def test_an_unknown_plugin_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"\$STILLROOM_PLUGINS: cannot import plugin 'no_such_plugin_module'"):
        load_plugins("no_such_plugin_module")
