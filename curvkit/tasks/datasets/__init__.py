"""Built-in datasets, one registered part per module (the module named as the part)."""
