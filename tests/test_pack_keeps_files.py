"""``stillroom pack`` and ``stillroom demo`` never lose a file they did not write (issue 26, item 1).

A pack writes over or removes only files that an earlier pack in the same folder wrote (its sidecar lists
them). Another split's files (``val`` packed with ``--prefix val``, then ``train`` into the same folder, as
the README's ImageNet steps do), and shards of other tools (no sidecar), are never touched; a re-pack that
would remove files of its earlier pack refuses, naming them, unless ``--replace`` says so. Every refusal
comes before anything is written, and the demo writes only into a folder of its own.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.errors import DataError
from pipeline.shards.lists import load_shard_list
from pipeline.shards.pack import pack
from pipeline.shards.samples import iter_raw


def image_folder(root: Path, per_class: int = 6, classes: int = 2) -> Path:
    """A small ImageFolder tree of flat-colour PNGs (fast to pack)."""
    for c in range(classes):
        for i in range(per_class):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (40 * c, 20 * i, 7)).save(buf, format="PNG")
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            (root / f"c{c}" / f"{i}.png").write_bytes(buf.getvalue())
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def keys(folder: Path, spec: str) -> list[str]:
    return [r.key for i, s in enumerate(load_shard_list(str(folder / spec))) for r in iter_raw(s, i)]


def test_packing_train_after_val_keeps_the_val_split(tmp_path: Path) -> None:
    """The README's step 1 in the other order: val (--prefix val), then train, into one folder."""
    src, out = image_folder(tmp_path / "src"), tmp_path / "shards"
    pack(str(src), str(out), per_shard=4, prefix="val")
    val = {n: b for n, b in snapshot(out).items() if n.startswith("val")}
    assert len(val) == 4  # 3 shards and val.json
    pack(str(src), str(out), per_shard=5)
    after = snapshot(out)
    assert {n: after.get(n) for n in val} == val, "the val split was touched"
    assert len(keys(out, "train.json")) == len(keys(out, "val.json")) == 12
    pack(str(src), str(out), per_shard=5)  # re-packing train, too, keeps val
    assert {n: snapshot(out).get(n) for n in val} == val


def test_shards_no_pack_wrote_are_never_deleted_nor_written_over(tmp_path: Path) -> None:
    src, out = image_folder(tmp_path / "src"), tmp_path / "shards"
    out.mkdir()
    (out / "val-000000.tar").write_bytes(b"another tool's val shard")
    pack(str(src), str(out), per_shard=5)  # train only: val-* is not this pack's business
    assert (out / "val-000000.tar").read_bytes() == b"another tool's val shard"
    for foreign in ("train-000007.tar", "train-000000.tar"):
        other = tmp_path / foreign
        other.mkdir()
        (other / foreign).write_bytes(b"a user's shard")
        before = snapshot(other)
        with pytest.raises(DataError, match=rf"holds {foreign}, which no earlier pack in this folder wrote"):
            pack(str(src), str(other), per_shard=5)
        assert snapshot(other) == before, "a refused pack wrote or removed something"
    # the same with --replace: it removes only what an earlier pack wrote
    with pytest.raises(DataError, match="no earlier pack in this folder wrote"):
        pack(str(src), str(tmp_path / "train-000007.tar"), per_shard=5, replace=True)
    assert snapshot(tmp_path / "train-000007.tar") == {"train-000007.tar": b"a user's shard"}


def test_a_foreign_sidecar_name_is_not_written_over(tmp_path: Path) -> None:
    src, out = image_folder(tmp_path / "src"), tmp_path / "shards"
    out.mkdir()
    (out / "train.json").write_text('{"my": "notes"}')
    with pytest.raises(DataError, match=r"holds train\.json, which no earlier pack"):
        pack(str(src), str(out), per_shard=5)
    assert snapshot(out) == {"train.json": b'{"my": "notes"}'}


def test_a_repack_that_would_remove_files_refuses_unless_replace(tmp_path: Path) -> None:
    src, out = image_folder(tmp_path / "src"), tmp_path / "shards"
    pack(str(src), str(out), per_shard=3)  # 4 shards
    before = snapshot(out)
    with pytest.raises(DataError, match=r"would remove train-000002.tar, train-000003.tar .*--replace"):
        pack(str(src), str(out), per_shard=6)  # 2 shards
    assert snapshot(out) == before
    pack(str(src), str(out), per_shard=6, replace=True)
    assert sorted(snapshot(out)) == ["train-000000.tar", "train-000001.tar", "train.json"]
    assert sorted(keys(out, "train-*.tar")) == sorted(keys(out, "train.json")) and len(keys(out, "train.json")) == 12


def test_the_val_split_of_an_earlier_pack_goes_only_with_replace(tmp_path: Path) -> None:
    """Its samples are in train after a pack without --val-fraction: kept, they would leak into validation."""
    src, out = image_folder(tmp_path / "src", per_class=20), tmp_path / "shards"
    pack(str(src), str(out), per_shard=10, val_fraction=0.3)
    val = sorted(n for n in snapshot(out) if n.startswith("val"))
    before = snapshot(out)
    with pytest.raises(DataError, match=r"would remove val-000000.tar.*val.json.*--replace"):
        pack(str(src), str(out), per_shard=10)
    assert snapshot(out) == before
    pack(str(src), str(out), per_shard=10, replace=True)
    assert not any(n in snapshot(out) for n in val)
    assert len(keys(out, "*.tar")) == len(set(keys(out, "*.tar"))) == 40


def test_a_val_fraction_never_writes_over_a_val_split_packed_on_its_own(tmp_path: Path) -> None:
    src, out = image_folder(tmp_path / "src", per_class=20), tmp_path / "shards"
    pack(str(src), str(out), per_shard=10, prefix="val")
    before = snapshot(out)
    for replace in (False, True):
        with pytest.raises(DataError, match=r"val.json: .* holds a split 'val' that was packed on its own"):
            pack(str(src), str(out), per_shard=10, val_fraction=0.3, replace=replace)
        assert snapshot(out) == before
    # and packing val on its own never writes over the --val-fraction split of train
    other = tmp_path / "other"
    pack(str(src), str(other), per_shard=10, val_fraction=0.3)
    before = snapshot(other)
    with pytest.raises(DataError, match=r"is the --val-fraction split of 'train'"):
        pack(str(src), str(other), per_shard=10, prefix="val")
    assert snapshot(other) == before


def test_a_pack_stopped_midway_can_be_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards written before a kill are listed in the sidecar first, so the next pack may write over them."""
    import webdataset

    src, out = image_folder(tmp_path / "src"), tmp_path / "shards"
    pack(str(src), str(out), per_shard=6)  # 2 shards
    real, written = webdataset.TarWriter, []

    def dying(path: str, **kw):  # the fourth shard's writer dies, as a kill would stop the pack
        written.append(path)
        if len(written) == 4:
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(webdataset, "TarWriter", dying)
    with pytest.raises(KeyboardInterrupt):
        pack(str(src), str(out), per_shard=3)  # 4 shards: 0 to 2 written, then killed
    monkeypatch.undo()
    meta = pack(str(src), str(out), per_shard=3)
    assert [s["name"] for s in meta["train"]["shards"]] == [f"train-00000{i}.tar" for i in range(4)]
    assert "writing" not in json.loads((out / "train.json").read_text())


def test_cli_pack_refusal_is_one_error_line_and_replace_is_a_flag(tmp_path: Path) -> None:
    from cli.main import app

    src, out = image_folder(tmp_path / "src"), tmp_path / "shards"
    runner = CliRunner()
    assert runner.invoke(app, ["pack", str(src), str(out), "--per-shard", "3"]).exit_code == 0
    bad = runner.invoke(app, ["pack", str(src), str(out), "--per-shard", "6"])
    assert bad.exit_code == 2 and bad.output.count("error:") == 1 and "--replace" in bad.output, bad.output
    good = runner.invoke(app, ["pack", str(src), str(out), "--per-shard", "6", "--replace"])
    assert good.exit_code == 0, good.output
    assert sorted(snapshot(out)) == ["train-000000.tar", "train-000001.tar", "train.json"]


def test_demo_writes_only_into_a_folder_of_its_own(tmp_path: Path) -> None:
    """``stillroom demo --out D`` over a folder with a user's shard refuses before writing anything."""
    from cli.main import app

    data = tmp_path / "D" / "data"
    data.mkdir(parents=True)
    (data / "train-000009.tar").write_bytes(b"a user's shard")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "D"), "--size", "tiny"])
    assert result.exit_code == 2 and "error:" in result.output and "train-000009.tar" in result.output, result.output
    assert [p.name for p in (tmp_path / "D").rglob("*")] == ["data", "train-000009.tar"]
    assert (data / "train-000009.tar").read_bytes() == b"a user's shard"
