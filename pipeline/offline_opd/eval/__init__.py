"""Evaluation metrics that are not part of training."""
