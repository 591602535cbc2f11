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
    from tsarank_engine.devices import BF16_FASTER, cpu_bf16_speedup, cpu_bf16_units

    assert f"bfloat16 units: {cpu_bf16_units()}" in out

    chosen = "bfloat16, on the mixed path" if cpu_bf16_speedup() >= BF16_FASTER else "float32"
    assert f"scoring --dtype auto: {chosen} (bfloat16 products measured" in out
    if not torch.cuda.is_available():
        assert "cuda: no device" in out


def test_the_cpus_bfloat16_units_are_read_from_its_feature_flags():
    from tsarank_engine.devices import cpu_bf16_units

    epyc = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n"
    xeon = "flags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    graviton = "Features\t: fp asimd sve bf16 i8mm\n"
    older = "flags\t\t: fpu sse avx2 avx512f\n"
    assert cpu_bf16_units(epyc) == "AVX512-BF16"
    assert cpu_bf16_units(xeon) == "AMX, AVX512-BF16"
    assert cpu_bf16_units(graviton) == "Arm BF16"
    assert cpu_bf16_units(older) == "none" and cpu_bf16_units("") == "none"
