"""picochat: train your own small ChatGPT from scratch, end to end."""

__version__ = "0.1.0"
