"""Training on Ray Train: the run directory, the worker loop, the loader, checkpoints, schedule."""
