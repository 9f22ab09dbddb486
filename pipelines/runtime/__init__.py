"""The one runtime of a trained model: which checkpoint answers, loading it with its encoder, cache and engine."""
