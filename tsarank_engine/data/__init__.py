"""The data room: from input files to packed rows.

Holds the readers of every input file (readers.py), tokenization and the paper's prompt (tokenization.py,
prompting.py), token sequences and candidate groups (sequences.py), packing (packing.py), the seeded,
resumable training order (stream.py) and the builders of training data from a collection (collection.py).
It may import the foundation (errors, devices, files) and tsarank_kernels' layouts, not the model.
"""
