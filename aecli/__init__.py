"""aecli: train convolutional image autoencoders and VAEs, and put them to work."""

__version__ = "0.2.0"

# cuBLAS's workspace setting for reproducible matrix products (train.deterministic). cuBLAS reads
# it at the process's first matrix product, so the command line sets it at start-up
# (aecli.cli.main); the engine sets it where nothing did, effective only before that product.
CUBLAS_WORKSPACE = ":4096:8"


def __getattr__(name: str):
    """`from aecli import LatentFolder`, imported when asked for: `import aecli` (the command
    line, at start-up) stays free of torch and numpy."""
    if name == "LatentFolder":
        from aecli.io.latent_folder import LatentFolder

        return LatentFolder
    raise AttributeError(f"module 'aecli' has no attribute {name!r}")
