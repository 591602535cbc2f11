"""tsarank_kernels: the Triton kernels of tsarank-engine and their PyTorch references.

Installed under this name (setup.py's package_dir) from kernels/tsarank_kernels/, one level below the
top-level kernels/ folder, so that no module of ours takes the name of the PyPI package `kernels`, which
transformers imports (DESIGN.md, "Layout"). The decoder uses the packed attention and the block ops through
tsarank_engine.model.attention and tsarank_engine.model.decoder; the training losses use the fused linear op, the rank
loss and the ranking head (DESIGN.md, "Kernels", says which paths each op has).
"""
