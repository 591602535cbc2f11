"""Writing whole or not at all (tsarank_engine.files): a file and a folder, each replaced only by a whole new one."""

import pytest

from tsarank_engine.errors import TsarankError
from tsarank_engine.files import atomic_write, staged_dir, stale_temporaries


def test_a_file_is_replaced_whole_or_left_as_it_was(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(out) as f:
            f.write("new, half")
            raise RuntimeError("failed mid-write")
    assert out.read_text() == "old\n" and not stale_temporaries(out)
    with atomic_write(out) as f:
        f.write("new\n")
    assert out.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_a_folder_is_replaced_whole_or_left_as_it_was(tmp_path):
    out = tmp_path / "best"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as staging:
            (staging / "model.safetensors").write_text("new, half")
            raise RuntimeError("failed mid-export")
    assert [p.name for p in tmp_path.iterdir()] == ["best"] and (out / "model.safetensors").read_text() == "old"
    with staged_dir(out) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".best.")
        (staging / "model.safetensors").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["best"] and (out / "model.safetensors").read_text() == "new"
    with staged_dir(tmp_path / "deeper" / "final") as staging:  # parents made
        (staging / "config.json").write_text("{}")
    assert (tmp_path / "deeper" / "final" / "config.json").is_file()


def test_an_unwritable_place_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TsarankError, match="cannot write the output there"):
        with staged_dir(blocker / "out"):
            pass
    with pytest.raises(TsarankError, match="cannot write the output there"):
        with atomic_write(blocker / "out.txt"):
            pass
