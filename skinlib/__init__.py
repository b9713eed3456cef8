"""skinlib: the logic behind the skin-attribute grounding companion book."""
__version__ = "0.1.0"
