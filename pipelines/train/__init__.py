"""Train: stage 1 and stage 2 on cached features (Ray Train)."""
