"""`tsarank-engine doctor` names versions, devices and the backends each device will use."""

import torch
from click.testing import CliRunner

from tsarank_engine.cli import main


def test_doctor_reports_versions_devices_and_backends():
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"torch {torch.__version__}" in out and "triton " in out and "flash-attn " in out
    assert "cpu (float32, the default there):" in out
    assert "attention: sdpa (the varlen kernels need CUDA, and this is cpu)" in out
    assert "RMSNorm, RoPE, SwiGLU: torch" in out and "LM-head losses and scores: torch" in out
    from tsarank_engine.devices import BF16_FASTER, cpu_bf16_speedup

    chosen = "bfloat16, on the mixed path" if cpu_bf16_speedup() >= BF16_FASTER else "float32"
    assert f"scoring --dtype auto: {chosen} (bfloat16 products measured" in out
    if not torch.cuda.is_available():
        assert "cuda: no device" in out
