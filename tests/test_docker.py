"""The Dockerfile, the image scripts and the shipped configs, checked without a container engine.

Building and running the image takes minutes and a container engine (``scripts/build-image.sh``
and ``scripts/test-image.sh``, run separately from this suite). What keeps it honest in every test
run is that its install step is ``scripts/setup.sh``, the very script the README quick start and
CI run. These tests pin that contract, the entrypoint and the non-root user, check the two image
scripts statically (strict bash, the AWS Batch array they run, CLI flags that exist), and check
that every preset in ``configs/`` loads into its dataclass with known keys only (a typo would
otherwise surface hours into a cluster job).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from pipeline.config import read_yaml, resolve

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CONFIGS = ROOT / "configs"
SETUP = "scripts/setup.sh"


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: comments dropped, ``\\`` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    if pending.strip():
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    """Arguments of ENTRYPOINT/CMD: the JSON (exec) form, else shell words."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return shlex.split(args)
    assert isinstance(value, list), f"expected a JSON list, got {args!r}"
    return [str(v) for v in value]


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    assert DOCKERFILE.exists(), "Dockerfile is missing"
    return parse_dockerfile(DOCKERFILE.read_text())


def test_parser_handles_continuations_and_comments() -> None:
    text = 'FROM x\n# c\nRUN a \\\n    # inner\n    && b\nENTRYPOINT ["stillroom"]\n'
    assert parse_dockerfile(text) == [("FROM", "x"), ("RUN", "a && b"), ("ENTRYPOINT", '["stillroom"]')]


def test_base_image_is_an_argument_defaulting_to_slim_python(instructions: list[tuple[str, str]]) -> None:
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for kind, a in instructions if kind == "ARG" and "=" in a}
    assert args.get("BASE_IMAGE", "").startswith("python:3.11"), "ARG BASE_IMAGE must default to python:3.11-*"
    froms = [a for kind, a in instructions if kind == "FROM"]
    assert froms and "${BASE_IMAGE}" in froms[0].replace("$BASE_IMAGE", "${BASE_IMAGE}")


def test_install_step_is_the_setup_script(instructions: list[tuple[str, str]]) -> None:
    runs = [a for kind, a in instructions if kind == "RUN"]
    setup_runs = [r for r in runs if SETUP in r]
    assert len(setup_runs) == 1, f"exactly one RUN must call {SETUP}; RUN steps: {runs}"
    assert re.search(r"\bbash\s+scripts/setup\.sh\b", setup_runs[0]), setup_runs[0]
    venv = re.search(r"\bVENV=(\S+)", setup_runs[0])
    assert venv, "the setup RUN must choose the image's venv with VENV=..."
    # One source of install steps: no Python package is installed outside the script.
    for r in runs:
        assert not re.search(r"\bpip3?\s+install\b|-m\s+pip\s+install\b", r), f"pip install outside {SETUP}: {r}"
    # The venv it builds is the one on PATH, so the entrypoint resolves to it.
    env = " ".join(a for kind, a in instructions if kind == "ENV")
    assert f"{venv.group(1)}/bin" in env, f"PATH must include {venv.group(1)}/bin"
    # The repository is copied in before the script runs.
    kinds = [k for k, _ in instructions]
    setup_at = next(i for i, (k, a) in enumerate(instructions) if k == "RUN" and SETUP in a)
    assert "COPY" in kinds[:setup_at], "the repository must be copied before running the setup script"
    assert (ROOT / SETUP).exists()


def test_readme_and_ci_use_the_same_setup_script() -> None:
    readme = ROOT / "README.md"
    assert readme.exists()
    assert "bash scripts/setup.sh" in readme.read_text(), "the README quick start must run scripts/setup.sh"
    test_sh, ci = ROOT / "scripts" / "test.sh", ROOT / ".ci" / "run"
    if not test_sh.exists() or not ci.exists():
        pytest.skip("scripts/test.sh or .ci/run not written yet")
    assert "setup.sh" in test_sh.read_text(), "scripts/test.sh must set up through scripts/setup.sh"
    ci_text = ci.read_text()
    assert "scripts/test.sh" in ci_text or "setup.sh" in ci_text, ".ci/run must go through scripts/test.sh"


def test_entrypoint_is_the_cli(instructions: list[tuple[str, str]]) -> None:
    entry = [a for kind, a in instructions if kind == "ENTRYPOINT"]
    assert entry, "no ENTRYPOINT"
    words = exec_form(entry[-1])
    assert words and Path(words[0]).name == "stillroom", f"ENTRYPOINT must run the stillroom CLI, got {words}"
    assert entry[-1].lstrip().startswith("["), "use the exec (JSON) form so signals reach stillroom"


def test_runs_as_a_non_root_user(instructions: list[tuple[str, str]]) -> None:
    users = [(i, a.split(":")[0].strip()) for i, (kind, a) in enumerate(instructions) if kind == "USER"]
    assert users, "no USER instruction: the image would run as root"
    last_at, last = users[-1]
    assert last not in ("root", "0"), f"final USER is {last!r}"
    setup_at = next(i for i, (k, a) in enumerate(instructions) if k == "RUN" and SETUP in a)
    assert last_at > setup_at, "switch to the non-root user after the install step"
    entry_at = max(i for i, (k, _) in enumerate(instructions) if k == "ENTRYPOINT")
    assert last_at < entry_at


def test_workdir_and_volumes(instructions: list[tuple[str, str]]) -> None:
    assert ("WORKDIR", "/app") in instructions
    volumes = " ".join(a for kind, a in instructions if kind == "VOLUME")
    for path in ("/data", "/cache", "/out"):
        assert path in volumes, f"VOLUME {path} is not declared"


def test_dockerignore_keeps_local_state_out() -> None:
    path = ROOT / ".dockerignore"
    assert path.exists()
    entries = {line.strip().rstrip("/") for line in path.read_text().splitlines() if line.strip()}
    for name in (".venv", ".git", "runs", "demo-out"):
        assert name in entries, f".dockerignore should exclude {name}"
    # The setup script and the sources must reach the image.
    for needed in ("scripts", "pipeline", "cli", "pyproject.toml", "README.md", "configs"):
        assert needed not in entries, f".dockerignore must not exclude {needed}"


# -- configs -----------------------------------------------------------------------------------


def _config_class(path: Path) -> type:
    from pipeline.options import CacheConfig
    from pipeline.train_options import TrainConfig

    name = path.name
    return CacheConfig if name.startswith("cache_") or name.endswith("_cache.yaml") else TrainConfig


def load_preset(cls: type, path: Path):
    """Resolve a preset (coercing every value to its field's type) with what it leaves to the command
    line filled in (e.g. tiny_cpu.yaml: --shards, --cache, --out)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    keys = {k.replace("-", "_") for k in read_yaml(str(path))}
    given = {"shards": ["train-000000.tar"], "out": "out", "cache": "cache.zarr"}
    return resolve(cls, str(path), {k: v for k, v in given.items() if k in fields and k not in keys})


CONFIG_FILES = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "demo.yaml")


def test_expected_presets_exist() -> None:
    names = {p.name for p in CONFIG_FILES}
    for name in (
        "deit_tiny.yaml",
        "deit_small.yaml",
        "deit_base.yaml",
        "cache_regnety160.yaml",
        "tiny_cpu.yaml",
        "tiny_cpu_cache.yaml",
    ):
        assert name in names, f"configs/{name} is missing"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_loads_into_its_dataclass(path: Path) -> None:
    import timm

    from pipeline.views.recipe import make_recipe

    cls = _config_class(path)
    fields = {f.name for f in dataclasses.fields(cls)}
    keys = {k.replace("-", "_") for k in read_yaml(str(path))}
    assert keys, f"{path.name} is empty"
    assert keys <= fields, f"{path.name}: unknown keys {sorted(keys - fields)}"
    cfg = load_preset(cls, path)
    assert isinstance(cfg, cls)
    assert cfg.device in ("cpu", "cuda")
    assert cfg.on_error in ("raise", "skip")
    if cls.__name__ == "CacheConfig":
        assert timm.is_model(cfg.teacher), f"{path.name}: teacher {cfg.teacher!r} is not a timm model"
        make_recipe(cfg.recipe, cfg.img_size)  # a recipe mapping must name only real fields
        assert 1 <= cfg.view_block <= cfg.views
        assert cfg.topk >= 1 and cfg.temperatures
    else:
        assert timm.is_model(cfg.model), f"{path.name}: model {cfg.model!r} is not a timm model"
        assert cfg.distillation in ("none", "hard", "soft")
        assert cfg.teacher_mode in ("cached", "live")
        if cfg.recipe is not None:
            make_recipe(cfg.recipe, cfg.img_size)
        if cfg.distillation == "soft" and cfg.cache is None:
            assert cfg.tau in cfg.temperatures


def test_deit_presets_follow_the_deit_recipe() -> None:
    from pipeline.train_options import TrainConfig

    for size in ("tiny", "small", "base"):
        cfg = load_preset(TrainConfig, CONFIGS / f"deit_{size}.yaml")
        assert cfg.model == f"deit_{size}_distilled_patch16_224"
        assert cfg.recipe is None, "the recipe must come from the cache"
        assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.warmup_epochs) == (300, 5e-4, 0.05, 5)
        assert cfg.batch_size * 8 * cfg.accum_steps == 1024, "DeiT's global batch on 8 GPUs"
        assert (cfg.distillation, cfg.alpha, cfg.tau) == ("hard", 0.5, 1.0)


def test_resnet50_preset_distils_a_one_head_student_from_the_deit_cache() -> None:
    """configs/resnet50_kd.yaml: a ResNet-50 (one head) trained from the RegNetY-16GF cache preset's views."""
    from pipeline.models.build import create
    from pipeline.options import CacheConfig
    from pipeline.train_options import TrainConfig

    cfg = load_preset(TrainConfig, CONFIGS / "resnet50_kd.yaml")
    cache = load_preset(CacheConfig, CONFIGS / "cache_regnety160.yaml")
    assert cfg.model == "resnet50" and cfg.recipe is None, "the views (recipe, seed) must come from the cache"
    assert cfg.cache == [cache.out] and cfg.repeats == cache.repeats == 3
    assert cfg.epochs <= cache.views, "one cached view per epoch, none repeated"
    assert cfg.batch_size * 8 * cfg.accum_steps == 1024
    assert cfg.distillation in ("hard", "soft") and cfg.tau in cache.temperatures
    assert (cfg.weight_decay, cfg.drop_path, cfg.warmup_epochs) == (0.02, 0.05, 5)
    assert not hasattr(create(cfg.model, 1000), "head_dist"), "a one-head student"


def test_tiny_presets_fit_together() -> None:
    """The tiny train preset trains from a cache made by the tiny cache preset."""
    from pipeline.models.build import create
    from pipeline.options import CacheConfig
    from pipeline.train_options import TrainConfig
    from pipeline.views.recipe import make_recipe

    train = load_preset(TrainConfig, CONFIGS / "tiny_cpu.yaml")
    cache = load_preset(CacheConfig, CONFIGS / "tiny_cpu_cache.yaml")
    recipe = make_recipe(cache.recipe, cache.img_size)
    assert train.model_kwargs.get("img_size") == recipe.img_size
    assert (train.device, cache.device) == ("cpu", "cpu")
    model = create(train.model, 10, **train.model_kwargs)
    assert sum(p.numel() for p in model.parameters()) < 100_000, "the tiny student should stay tiny"


def test_demo_config_sections_use_known_keys() -> None:
    """configs/demo.yaml holds one section per step; each uses the keys of the step it feeds."""

    from pipeline.options import CacheConfig, PackConfig
    from pipeline.train_options import TrainConfig

    path = CONFIGS / "demo.yaml"
    if not path.exists():
        pytest.skip("configs/demo.yaml not written yet")
    data = read_yaml(str(path))
    known = {
        "pack": {f.name for f in dataclasses.fields(PackConfig)},
        "teacher": {f.name for f in dataclasses.fields(TrainConfig)},
        "student": {f.name for f in dataclasses.fields(TrainConfig)},
        "cache": {f.name for f in dataclasses.fields(CacheConfig)},
    }
    sections = [(name, data[name]) for name in known if isinstance(data.get(name), dict)]
    sections += [
        (name, sub) for name, sub in (data.get("tiny") or {}).items() if name in known and isinstance(sub, dict)
    ]
    if not sections:
        pytest.skip("configs/demo.yaml has none of the sections pack/teacher/cache/student")
    for name, section in sections:
        keys = {k.replace("-", "_") for k in section}
        assert keys <= known[name], f"demo.yaml [{name}]: unknown keys {sorted(keys - known[name])}"
    if isinstance(data.get("recipe"), dict):
        from pipeline.views.recipe import make_recipe

        make_recipe(data["recipe"])


# -- scripts/build-image.sh and scripts/test-image.sh ------------------------------------------

SCRIPTS = ("scripts/build-image.sh", "scripts/test-image.sh")
TEST_IMAGE = ROOT / "scripts" / "test-image.sh"


@pytest.mark.parametrize("name", SCRIPTS)
def test_image_script_is_strict_executable_bash(name: str) -> None:
    import os
    import subprocess

    path = ROOT / name
    assert path.exists(), f"{name} is missing"
    assert os.access(path, os.X_OK), f"{name} is not executable"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash"), f"{name} must start with a bash shebang"
    assert "set -euo pipefail" in text, f"{name} must run with set -euo pipefail"
    prefix = Path(name).stem
    assert f"PREFIX={prefix}" in text, f"{name}'s messages must start with '{prefix}:'"
    parsed = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert parsed.returncode == 0, f"bash -n {name}: {parsed.stderr}"


def test_image_scripts_are_shellcheck_clean() -> None:
    import shutil
    import subprocess

    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    paths = [str(ROOT / n) for n in (*SCRIPTS, "scripts/container-common.sh")]
    result = subprocess.run(["shellcheck", "-x", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_script_passes_the_dockerfile_arguments(instructions: list[tuple[str, str]]) -> None:
    text = (ROOT / "scripts" / "build-image.sh").read_text()
    declared = {a.split("=", 1)[0] for kind, a in instructions if kind == "ARG"}
    for arg in re.findall(r"--build-arg \"(\w+)=", text):
        assert arg in declared, f"build-image.sh passes --build-arg {arg}, which the Dockerfile does not declare"
    assert {"BASE_IMAGE", "VARIANT"} <= set(re.findall(r"--build-arg \"(\w+)=", text))
    for option in ("--tag", "--base", "--variant"):
        assert option in text, f"build-image.sh has no {option} option"


def test_image_test_runs_a_two_job_aws_batch_array_at_once() -> None:
    text = TEST_IMAGE.read_text()
    assert re.search(r"^ARRAY_SIZE=2$", text, re.M), "the phase-1 array must have two jobs"
    assert '-e "AWS_BATCH_JOB_ARRAY_INDEX=$i"' in text
    assert '-e "AWS_BATCH_JOB_ARRAY_SIZE=$ARRAY_SIZE"' in text
    # Both jobs are started detached in one loop, and only then waited for: they run concurrently.
    start = text[text.index("start_array() {") :]
    start = start[: start.index("\n}\n")]
    assert re.search(r"for \(\(i = 0; i < ARRAY_SIZE; i\+\+\)\)", start) and " run -d " in start
    assert "wait" not in start, "start_array must not wait for a job before starting the next"
    assert "check_overlap" in text, "the test must check that the two jobs overlapped in time"
    assert "kill --signal KILL" in text and "diff -r" in text, "the kill/re-run step must compare the caches"


def test_image_test_runs_as_the_images_non_root_user(instructions: list[tuple[str, str]]) -> None:
    text = TEST_IMAGE.read_text()
    runs = " ".join(a for kind, a in instructions if kind == "RUN")
    uid = re.search(r"useradd\b.*--uid (\d+)", runs)
    assert uid, "the Dockerfile must create its user with a fixed --uid"
    assert f"IMAGE_UID={uid.group(1)}" in text, "test-image.sh must expect the Dockerfile's uid"
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "--user" not in code and "--privileged" not in code, "test-image.sh must use the image's own user"
    assert '--entrypoint id "$IMAGE" -u' in text, "test-image.sh must check the uid the image runs as"


def _cli_options() -> dict[str, set[str]]:
    import typer

    from cli.main import app

    group = typer.main.get_command(app)
    return {
        name: {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", [])) if o.startswith("--")}
        for name, cmd in group.commands.items()
    }


def test_image_test_uses_existing_cli_flags() -> None:
    """The flags test-image.sh passes (listed at its top) exist: a renamed flag fails here, not in a container."""
    text = TEST_IMAGE.read_text()
    options = _cli_options()
    used: dict[str, set[str]] = {}
    for command, body in re.findall(r"\((pack|cache-teacher|cache-status|verify-cache|train-student)\b([^)]*)\)", text):
        used.setdefault(command, set()).update(re.findall(r"(--[a-z][a-z-]*)", body))
    for line in text.splitlines():
        if '"${TRAIN[@]}"' in line:
            used.setdefault("train-student", set()).update(re.findall(r"(--[a-z][a-z-]*)", line))
    quiet = re.search(r"^QUIET=\(([^)]*)\)", text, re.M)
    assert quiet, "test-image.sh must define QUIET=(...), the flags that turn progress bars off"
    for command in ("cache-teacher", "train-student"):
        used.setdefault(command, set()).update(re.findall(r"(--[a-z][a-z-]*)", quiet.group(1)))
    assert {"pack", "cache-teacher", "cache-status", "verify-cache", "train-student"} <= set(used)
    for command, flags in used.items():
        assert command in options, f"test-image.sh runs `stillroom {command}`, which no longer exists"
        unknown = flags - options[command]
        assert not unknown, f"test-image.sh passes {sorted(unknown)} to `stillroom {command}`, which has no such flags"


def test_image_test_reads_the_job_line_cache_teacher_logs() -> None:
    """test-image.sh parses 'N already done' out of cache-teacher's first log line: the two must agree."""
    source = (ROOT / "pipeline" / "phase1" / "cache_teacher.py").read_text()
    fmt = re.search(r'"(job %d/%d \(%s\): [^"]*already done[^"]*)"', source)
    assert fmt, "cache-teacher's job line is gone: update scripts/test-image.sh with it"
    line = "2026-01-01 INFO pipeline.phase1.cache_teacher: " + fmt.group(1) % (
        0,
        2,
        "AWS Batch array job",
        10,
        20,
        3,
        0,
    )
    expr = re.search(r"already=\$\(sed -n '([^']+)'", TEST_IMAGE.read_text())
    assert expr, "test-image.sh no longer reads the already-done count with sed"
    out = subprocess.run(["sed", "-n", expr.group(1)], input=line, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3", (line, expr.group(1), out.stdout)
