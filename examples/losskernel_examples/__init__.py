"""The tutorials' pipelines: synthetic and real tasks with known structure (data, models,
training loops, trained checkpoints). Not part of the devinterp-losskernel library."""
