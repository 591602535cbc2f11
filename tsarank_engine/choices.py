"""The allowed values of each choice a user makes by name (recipe keys, command-line options, Python API), defined
once here, without importing torch, so that the command line can offer them before loading anything."""

DEVICES = ("auto", "cpu", "cuda")  # and "cuda:N" through the Python API
DTYPES = ("float32", "bfloat16", "float16")  # float16 on CUDA only; "auto" resolves to one of these
WIDE_DTYPES = ("float32", "bfloat16")  # float32's exponent range: what training computes in, what export writes
ATTENTION = ("auto", "flash_attn", "torch_varlen", "triton", "sdpa")  # model/attention.py's backends
BLOCK_OPS = ("auto", "torch", "triton")  # the path of RMSNorm, RoPE and SwiGLU
