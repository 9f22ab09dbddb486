"""Shipped YAML configurations: demo.yaml (the embedded default) and paper.yaml (the paper's recipe)."""
