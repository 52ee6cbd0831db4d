"""negatron: bi-encoder model, data readers, losses, training and the CLI."""
__version__ = "0.1.0"
