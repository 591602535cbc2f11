"""The training room (not `train`: that name is the public function of the package): the loop and what it hands work to.

Holds the loop (trainer.py), the two stages' losses on packed rows (objectives.py), the stream a recipe
trains on (stream.py), checkpoints (checkpoints.py), the learning-rate schedule (schedule.py) and evaluation
during training (validation.py). It may import every room below it (model, data, rank), `distributed` and
`recipe`; only the command line and the package's public surface sit above it.
"""
