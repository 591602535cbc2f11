"""The model room: what a checkpoint is and how the engine computes with it.

Holds the configuration (config.py), the decoder and its attention backends (decoder.py, attention.py), LoRA
adapters (lora.py), safetensors I/O, loading and export (safetensors_io.py, loading.py, export.py, shards.py) and the
embedded default model (builtin.py). It may import the top-level foundation (errors, devices, files) and
tsarank_kernels, nothing else of the engine: the model stays a model; parallelism and training are applied
from outside.
"""
