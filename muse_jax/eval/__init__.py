"""Evaluation metrics (FID, CLIP score)."""
