"""Weights only through safetensors, no remote code, no network; a training run writes inside its output
directory only."""

import os
import re
from pathlib import Path

import pytest

from test_trainer import CPT, recipe, run_cli

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "tsarank_engine").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])

FORBIDDEN = {
    r"\bimport pickle\b|\bpickle\.load": "pickle",
    r"torch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True",
    r"trust_remote_code\s*=\s*True": "trust_remote_code",
    r"\bimport (requests|urllib|http\.client|socket)\b": "network access",
    r"from_pretrained\((?![^)]*local_files_only=True)": "from_pretrained that may download",
}


def test_every_source_file_is_read():
    # a move of the sources must not empty the scan below (a flat glob once missed kernels/tsarank_kernels/)
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    expected = {"tsarank_engine/cli.py", "tsarank_engine/model/loading.py", "kernels/tsarank_kernels/fused_linear.py"}
    assert expected <= names
    assert len(SOURCES) > 40


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_pickle_remote_code_or_network(path):
    text = path.read_text()
    for pattern, what in FORBIDDEN.items():
        assert not re.search(pattern, text), f"{path.relative_to(ROOT)}: {what}"


@pytest.mark.slow
def test_a_training_run_writes_only_inside_its_output_directory(tmp_path, tiny_llama_dir):
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    scratch.mkdir()
    path = recipe(tmp_path, CPT, tiny_llama_dir, "run")
    before = {p for p in tmp_path.rglob("*")}
    run_cli("train", str(path), "--device", "cpu", env={"HOME": str(home), "TMPDIR": str(scratch)})
    created = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in created if not p.is_relative_to(tmp_path / "run")]
    assert not outside, outside
    assert any(p.name == "model.safetensors" for p in created)
    assert os.listdir(home) == [] and os.listdir(scratch) == []
