"""The house rules of ``docs/architecture.md``, checked: layers without cycles, a reading layer without
torch, modules and classes of a readable size, and a wheel that carries its presets."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
DOC = ROOT / "docs" / "architecture.md"
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 200


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PIPELINE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every ``pipeline`` module ``name`` imports, at any depth of its code (under TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            # the longest known module that the target names (``pipeline.cache.meta.CacheMeta`` -> ``...meta``)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def layer_block() -> list[list[str]]:
    """The ``layers`` block of docs/architecture.md, lowest first: each line one level, holding one layer or
    several sibling layers (``phase1 | inspection | phase2``); the base line names its modules."""
    block = re.search(r"```layers\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/architecture.md has no ```layers block"
    return [[name.strip() for name in line.split("|")] for line in block.group(1).splitlines() if line.strip()]


def base_modules() -> set[str]:
    """The modules of the base layer (files directly in ``pipeline/``), as the block's ``base:`` line names them."""
    line = next(names for level in layer_block() for names in level if names.startswith("base:"))
    return {f"pipeline.{n}" for n in line.partition(":")[2].split()}


def layer_of(module: str) -> str:
    """A module's layer is its folder under ``pipeline/``; the modules directly in it are the base layer,
    and the package ``pipeline`` itself (the public names it re-exports) sits above every layer."""
    if module == "pipeline":
        return "public"
    part = module.split(".")[1]
    return part if (PIPELINE / part).is_dir() else "base"


def levels() -> dict[str, int]:
    """Level of each layer (lowest first); ``public`` (the package root) above all."""
    block = layer_block()
    out = {name.partition(":")[0]: i for i, names in enumerate(block) for name in names}
    out["public"] = len(block)
    return out


def test_every_module_is_in_a_declared_layer() -> None:
    mods, level = modules(), levels()
    loose = sorted(m for m in mods if layer_of(m) == "base" and m not in base_modules())
    assert not loose, f"modules directly in pipeline/ that the base line does not name: {loose}"
    unknown = sorted({layer_of(m) for m in mods} - set(level))
    assert not unknown, f"folders under pipeline/ that the layers block does not name: {unknown}"
    missing = sorted(base_modules() - set(mods))
    assert not missing, f"base modules named in the block but not in pipeline/: {missing}"


def test_every_module_imports_only_its_own_or_lower_layers() -> None:
    g, level = graph(), levels()
    wrong = []
    for m, deps in g.items():
        for d in deps:
            lm, ld = layer_of(m), layer_of(d)
            if ld == "public" and lm != "public":
                wrong.append(f"{m} imports the package root {d} (its public names are for users)")
            elif level[ld] > level[lm]:
                wrong.append(f"{m} ({lm}) imports {d} ({ld}), a higher layer")
            elif level[ld] == level[lm] and ld != lm:
                wrong.append(f"{m} ({lm}) imports {d} ({ld}): sibling layers stay apart")
    assert not wrong, "\n".join(wrong)


def test_phase1_phase2_and_inspection_are_siblings() -> None:
    """The block keeps the two phases and the inspection commands side by side, so the test above refuses any
    import between them (phase 2 reading phase 1's code would couple what the cache contract keeps apart)."""
    level = levels()
    assert level["phase1"] == level["phase2"] == level["inspection"]
    assert level["phase2"] > level["models"] > level["cache"] > level["views"] > level["shards"] > level["storage"]


def test_the_layer_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    """The walker finds an import of a sibling inside a function (else the tests above prove nothing)."""
    (tmp_path / "x.py").write_text("def f():\n    from pipeline.phase1.cache_teacher import run\n")
    known = {"pipeline.phase1.cache_teacher", "pipeline.phase2.x"}
    assert imports_of("pipeline.phase2.x", tmp_path / "x.py", known) == {"pipeline.phase1.cache_teacher"}


def test_no_import_cycle() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d) :], d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_layer_check_fails_on_a_cycle(tmp_path: Path) -> None:
    """The walker sees relative, absolute and TYPE_CHECKING imports (else the two tests above prove nothing)."""
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
    (tmp_path / "a.py").write_text(src)
    assert imports_of("pipeline.a", tmp_path / "a.py", {"pipeline.a", "pipeline.b"}) == {"pipeline.b"}
    (tmp_path / "c.py").write_text("import pipeline.cache.meta\nfrom ..shards.lists import ShardInfo\n")
    known = {"pipeline.cache.meta", "pipeline.shards.lists", "pipeline.cache.c"}
    assert imports_of("pipeline.cache.c", tmp_path / "c.py", known) == {"pipeline.cache.meta", "pipeline.shards.lists"}


def test_the_shards_layer_imports_no_torch() -> None:
    """Reading, decoding and packing shards (and storage below them) need no torch: a packing job stays light."""
    names = sorted(m for m in modules() if layer_of(m) in ("shards", "storage"))
    heavy = "('torch', 'timm', 'torchvision', 'webdataset')"
    code = f"import sys, {', '.join(names)}; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _exceptions() -> set[str]:
    """Modules or classes allowed over the size limits: ``- `pipeline/x.py` ...`` lines of the doc's section."""
    section = DOC.read_text().split("## Size exceptions", 1)
    return set(re.findall(r"^- `([^`]+)`", section[1], re.M)) if len(section) > 1 else set()


def test_modules_and_classes_are_of_a_readable_size() -> None:
    allowed, too_big = _exceptions(), []
    for path in modules().values():
        rel = str(path.relative_to(ROOT))
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES and rel not in allowed:
            too_big.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES and f"{rel}::{node.name}" not in allowed:
                    too_big.append(f"{rel}::{node.name}: {size} lines")
    assert not too_big, too_big


@pytest.mark.slow
def test_a_wheel_carries_its_presets_into_a_clean_environment(tmp_path: Path) -> None:
    """``pip wheel .`` then a fresh venv (the project's dependencies visible, the source tree not): the
    installed ``stillroom`` finds its presets, and the demo reads its own."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path / "wheel")],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("stillroom-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipeline/presets/demo.yaml" in names and "pipeline/presets/deit_small.yaml" in names, names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "project-deps.pth").write_text(f"{deps}\n")  # dependencies only: its .pth files are not run
    pip = venv / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True}
    helped = subprocess.run([str(venv / "bin" / "stillroom"), "demo", "--help"], **run)
    assert helped.returncode == 0 and "--preset" in helped.stdout, helped.stderr
    listed = subprocess.run([str(venv / "bin" / "stillroom"), "presets"], **run)
    assert listed.returncode == 0 and "demo.yaml" in listed.stdout, listed.stderr
    assert str(site) in listed.stdout, "the presets must come from the installed package, not the source tree"
    code = "from pipeline.apps.demo import load_demo_config; print(sorted(load_demo_config(None, 'tiny')))"
    demo = subprocess.run([str(venv / "bin" / "python"), "-c", code], **run)
    assert demo.returncode == 0 and "student" in demo.stdout, demo.stderr
