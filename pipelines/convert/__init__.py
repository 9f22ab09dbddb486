"""Convert: official weights to ours and back."""
