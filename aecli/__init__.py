"""aecli: train convolutional image autoencoders and VAEs, and put them to work."""

__version__ = "0.1.0"
