"""The distributed runtime: environment, device mesh, parallelisation, training loop, checkpoints, metrics."""
