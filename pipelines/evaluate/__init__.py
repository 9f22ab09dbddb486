"""Evaluate: held-out loss and the visual-grounding gap of a checkpoint; MME, caption and VQA readers and scores."""
