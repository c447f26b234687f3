"""Data flows one way: raw files -> canonical tables -> task views -> batches."""
