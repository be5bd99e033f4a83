"""Safety checkpoints, taxonomy, training jobs and evaluation."""
