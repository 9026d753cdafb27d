"""Adaptive strategies (tokens per full pass depend on the model's confidence); see issue 4."""
