"""Persistence that knows nothing of the model: the checkpoint format and store (atomic,
verified, pruned) and fsync'd file I/O."""
