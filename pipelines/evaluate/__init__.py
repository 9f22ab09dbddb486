"""Evaluate: held-out loss and the visual-grounding gap of a checkpoint."""
