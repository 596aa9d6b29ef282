"""Compute in plain PyTorch: the MiniCPM model family, schedules, data, and the trial."""
