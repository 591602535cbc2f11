"""The training room (not `train`: that is the package's public function): the loop and what it hands work to.

Holds the loop and its bad-step policy (trainer.py), the model and optimizer a recipe trains (build.py), the
run's output folder (run_dir.py), its records and progress (run_log.py), the two stages' losses on packed rows
(objectives.py), the stream a recipe trains on (stream.py), checkpoints and the save/keep/export policy
(checkpoints.py), the learning-rate schedule (schedule.py) and evaluation during training (validation.py). It
may import every room below it (model, data, rank), `distributed` and `recipe`; only the command line and the
package's public surface sit above it.
"""
