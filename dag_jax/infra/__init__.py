"""Under the training system: mesh and shardings, checkpoints, metrics, opt-in CPU tuning."""
