"""Training loops and their parts: optimiser groups, lr schedule, checkpoints, distributed set-up."""
