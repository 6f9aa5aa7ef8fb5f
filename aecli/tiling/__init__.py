"""Encoding and decoding in tiles, so that device memory follows the tile, not the image.

`exact`: tiles that give the untiled result (the default). `fast`: tiles that normalise with
statistics estimated on a shrunk copy of the input and attend within each tile (--tile-fast).
"""

from aecli.tiling.exact import NotTileable, Plan, Runner, context, plan
from aecli.tiling.fast import Tiling, blend, cores, starts, statistics, tiled

__all__ = [
    "NotTileable",
    "Plan",
    "Runner",
    "Tiling",
    "blend",
    "context",
    "cores",
    "plan",
    "starts",
    "statistics",
    "tiled",
]
