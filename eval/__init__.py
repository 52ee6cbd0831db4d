"""negatron: eval."""
