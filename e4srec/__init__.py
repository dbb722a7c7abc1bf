"""E4SRec reproduction suite: data, evaluation, the one trainer, the E4SRec model and its stages."""
__version__ = "0.1.0"
