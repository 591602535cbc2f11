"""Weights only through safetensors, no remote code, no network; a training run writes inside its output
directory only."""

import os
import re
from pathlib import Path

import pytest

from test_trainer import CPT, recipe, run_cli

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "tsarank_engine").glob("*.py"), *(ROOT / "kernels").glob("*.py")])

FORBIDDEN = {
    r"\bimport pickle\b|\bpickle\.load": "pickle",
    r"torch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True",
    r"trust_remote_code\s*=\s*True": "trust_remote_code",
    r"\bimport (requests|urllib|http\.client|socket)\b": "network access",
    r"from_pretrained\((?![^)]*local_files_only=True)": "from_pretrained that may download",
}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_pickle_remote_code_or_network(path):
    text = path.read_text()
    for pattern, what in FORBIDDEN.items():
        assert not re.search(pattern, text), f"{path.name}: {what}"


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
