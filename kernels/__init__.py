"""tsarank_kernels: the Triton kernels of tsarank-engine and their PyTorch references.

Installed under this name (setup.py's package_dir) because the bare name `kernels` belongs to a PyPI
package that transformers imports when present. The fused loss kernels and packed attention land here
(DESIGN.md, "Kernels"); the decoder meanwhile runs on plain PyTorch through tsarank_engine.attention.
"""
