"""The `aecli` command line: one module per command over the shared core."""

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
    app()


__all__ = ["app", "main"]
