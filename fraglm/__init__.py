"""fraglm: train a small language model end to end with FragmentStream attention."""

__version__ = "0.1.0"
