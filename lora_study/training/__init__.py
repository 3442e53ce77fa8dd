"""Stage train: one adapter per run. The loop, how the base is loaded and quantized, the precision recipe, the loss,
batching, checkpoints, out-of-memory as data, and the memory planner that predicts a run's peak before it starts."""
