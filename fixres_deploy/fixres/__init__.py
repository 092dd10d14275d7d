"""The FixRes method: resolution prior, fine-tune, evaluation."""
