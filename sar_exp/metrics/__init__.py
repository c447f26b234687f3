"""Evaluation metrics, kept as states that reduce exactly across processes."""
