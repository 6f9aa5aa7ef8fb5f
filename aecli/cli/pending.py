"""Commands of DESIGN section 2 that later releases fill in; each exits 2 for now."""

from __future__ import annotations

import typer

from aecli.cli.app import app, not_implemented

_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}


def _register(name: str, summary: str) -> None:
    def command(ctx: typer.Context) -> None:
        not_implemented(name)

    command.__doc__ = f"{summary} (not implemented yet)."
    app.command(name, context_settings=_CONTEXT)(command)


for _name, _summary in {
    "sample": "Generate new images from the latent space",
    "interpolate": "Morph one image into another through the latent space",
}.items():
    _register(_name, _summary)
