"""Training: the loop, evaluation and metrics."""
