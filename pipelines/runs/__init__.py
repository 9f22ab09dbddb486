"""Training runs as their operator sees them: the list, a run's report, and comparisons of runs."""
