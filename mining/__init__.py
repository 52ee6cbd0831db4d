"""negatron: mining."""
