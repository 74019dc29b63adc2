"""Built-in model architectures, one registered part per module (the module named as the part)."""
