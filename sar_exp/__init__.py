"""sar_exp: an experiment framework for search-enhanced recommendation."""

__version__ = "0.1.0"
