"""The built-in model: synthetic data, architecture, training and the shipped weights."""
