"""Trainers: `train_and_evaluate(config, workdir)` per stage."""
