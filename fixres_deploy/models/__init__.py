"""Model specs, checkpoints, the base-model trainer, FLOP counting."""
