"""The Hydra app (train.py), its demo model and data, the sweep summary and the benchmark."""
