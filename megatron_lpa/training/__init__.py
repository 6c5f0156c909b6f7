"""Training: the loop, its state, and checkpoints of it."""
