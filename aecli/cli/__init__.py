"""The `aecli` command line: one module per command over the shared core."""

import os

from aecli import CUBLAS_WORKSPACE
from aecli.cli import (  # noqa: F401  (importing a module registers its commands)
    diff,
    export,
    generate,
    inspect,
    latents,
    reconstruct,
    runs,
    train,
)
from aecli.cli.app import app


def main() -> None:
    # before anything can run a matrix product on a GPU (a user's own setting stays)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    app()


__all__ = ["app", "main"]
