"""Demo: the synthetic source, its server, and the demo's base model, data and checks."""
