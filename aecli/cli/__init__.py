"""The `aecli` command line: one module per command over the shared core."""

from aecli.cli import inspect, pending, train  # noqa: F401  (registers the commands)
from aecli.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
