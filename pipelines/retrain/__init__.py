"""Retrain: plan, train, measure and promote on new data."""
