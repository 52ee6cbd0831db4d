"""negatron: index."""
