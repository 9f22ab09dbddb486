"""Stages as plain Python: each module has run(config) -> result; the only layer that imports ray."""
