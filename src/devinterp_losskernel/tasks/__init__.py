"""Synthetic tasks with known structure, for the tutorials (data, models, trained checkpoints)."""
