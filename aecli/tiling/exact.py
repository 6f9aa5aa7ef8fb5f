"""Exact tiled encoding and decoding: a fully convolutional model run tile by tile to the
result of running it on the whole image.

Two things make tiles differ from the whole, and both are removed here:

- **GroupNorm** normalises with statistics over its whole input. The model is cut into *stages*
  at every GroupNorm (and InstanceNorm): each stage runs tile by tile over the whole tensor,
  writing its tiles' cores into a whole output that is parked (host memory on a GPU, so that
  device memory follows the tile), and gathering per-channel moments from those cores (every
  pixel counted once). The next stage begins with the GroupNorm and normalises with the whole
  tensor's statistics.
- **Context.** Within a stage, each tile carries the halo its outputs need: the stage's
  operations (convolutions with their global zero padding, strides, transposed convolutions,
  upsampling, residual shortcuts) are walked backwards from the core to the input region it
  depends on, so the halo is the stage's receptive field, a few pixels, and the core's outputs
  equal the untiled ones. Zero padding is applied only at the image's own borders.

A block says how it tiles where it is written (aecli.models.blocks and each family's blocks),
beside its forward, in one of three ways:

- `halo` (blocks.TinyBlock, blocks.SoftClamp: no norms, its outputs depend on the input within
  that many pixels): its own forward runs on the core plus the halo (`Local`), so its forward
  is written once; one with a halo is a stage of its own, so that the halos of a model made of
  such blocks do not add up.
- `path()` and `shortcut` (blocks.Residual: latent diffusion's ResBlock and every residual
  block built the same way): forward and tiling both walk the same list of modules.
- `tile(t)`: the block tells the plan builder `t` its steps with the verbs `t.park()`,
  `t.module(m)`, `t.local(op)`, `t.norm(m)`, `t.add(source, *shortcut)`, `t.whole(fn)` and
  `t.gather(name, make)` (statistics other than a GroupNorm's gathered over the whole tensor:
  a linear attention's sums), with the operations of aecli.models.tile_ops (`Conv.of`, `Pointwise`,
  `PixelShuffle`, `PixelUnshuffle`, `Upsample`, `Uses`).

Self-attention runs over the whole tensor at once (it sits at the latent's resolution, 64
times fewer positions than pixels in an f8 model) with scaled_dot_product_attention, whose
flash and memory-efficient kernels keep memory linear in positions. Where even that would not
fit, it runs per tile, with the whole tensor's GroupNorm statistics, and says the result is
approximate.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from aecli.errors import AecliError
from aecli.models import blocks
from aecli.models.tile_ops import (
    LAST,
    Add,
    Conv,
    ConvTranspose,
    Local,
    Moments,
    Norm,
    NotTileable,
    Op,
    Pointwise,
    Upsample,
    normalise,
)

# -- the plan: stages between GroupNorms -----------------------------------------------------


@dataclass
class Stage:
    source: int  # the parked tensor it reads
    out: int  # the parked tensor it writes
    ops: list[Op] = field(default_factory=list)
    # a stage that runs a function over the whole tensor instead: self-attention
    # (blocks.Attention, with its per-tile fallback), or a block's `t.whole(fn)`
    whole: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Plan:
    stages: list[Stage]
    zooms: dict[int, Fraction]  # each tensor's pixels per image pixel
    # the reducers each parked tensor's statistics need: {tensor: {name: make a reducer}}
    # (`moments` for a GroupNorm)
    stats: dict[int, dict[str, Callable[[], object]]]
    result: int


class _Builder:
    def __init__(self, zoom: Fraction):
        self.stages: list[Stage] = []
        self.ops: list[Op] = []
        self.source = 0
        self.zooms = {0: zoom}
        self.zoom = zoom  # of the current (unparked) tensor
        self.stats: dict[int, dict[str, Callable[[], object]]] = {}

    # -- the verbs of a block's `tile(t)` --

    def park(self) -> int:
        """The current tensor, parked (the stage so far closed): its index, for `add`."""
        if self.ops:
            out = len(self.zooms)
            self.stages.append(Stage(self.source, out, self.ops))
            self.zooms[out] = self.zoom
            self.source, self.ops = out, []
        return self.source

    def local(self, op: Op) -> None:
        """A step whose outputs depend on the input near them (an Op of this module)."""
        self.ops.append(op)
        self.zoom *= op.zoom

    def gather(self, name: str, make: Callable[[], object]) -> int:
        """Park the current tensor and gather the reducer `make()` over all of it (as a
        GroupNorm's moments): a later `Uses(fn, source, name)` step reads it. The index of the
        parked tensor."""
        source = self.park()
        self.stats.setdefault(source, {})[name] = make
        return source

    def norm(self, module: nn.Module) -> None:
        """A GroupNorm (or InstanceNorm) with the whole tensor's statistics."""
        source = self.gather("moments", Moments)
        self.ops.append(Norm(module, source))

    def add(self, source: int, *shortcut: nn.Module | Op) -> None:
        """The current tensor plus the parked tensor `source` through `shortcut` (modules or
        Ops with local geometry: a 1x1 convolution, a pixel (un)shuffle, channel averaging;
        none for the identity)."""
        ops = []
        for part in shortcut:
            if isinstance(part, Op):
                ops.append(part)
                continue
            side = _Builder(self.zooms[source])
            side.module(part)
            if side.stages:
                raise NotTileable(f"a shortcut through a {type(part).__name__} (a norm)")
            ops += side.ops
        self.local(Add(source, ops))

    def whole(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """A stage that runs fn on the whole tensor at once, on the device (softmax attention
        over every position: it sits at the latent's resolution)."""
        source = self.park()
        out = len(self.zooms)
        self.stages.append(Stage(source, out, whole=fn))
        self.zooms[out] = self.zoom
        self.source = out

    def attention(self, module: blocks.Attention) -> None:
        source = self.park()
        self.stats.setdefault(source, {})["moments"] = Moments  # for the per-tile fallback
        self.whole(module)

    def module(self, module: nn.Module | Callable) -> None:
        """Any module (or a function of one tensor applied pixel by pixel)."""
        if isinstance(module, nn.Sequential):
            for child in module:
                self.module(child)
        elif callable(getattr(module, "tile", None)):
            module.tile(self)
        elif isinstance(module, blocks.Residual):
            skip = None if module.shortcut is None else self.park()
            for step in module.path():
                self.module(step)
            if skip is not None:
                self.add(skip, module.shortcut)
        elif isinstance(module, blocks.ConvBlock | blocks.ConvTransposeBlock):
            if isinstance(module, blocks.ConvBlock):
                self.local(Conv(module.conv, module.tf_same))
            else:
                self.local(ConvTranspose(module.conv, module.crop))
            self.module(module.norm)
            self.module(module.act)
        elif isinstance(module, blocks.Attention):
            self.attention(module)
        elif isinstance(getattr(module, "halo", None), int):
            if module.halo:
                # a stage of its own, so that the halos of a model without norms (TAESD: a few
                # dozen blocks) do not add up to a context of hundreds of pixels
                self.park()
                self.local(Local(module))
                self.park()
            else:
                self.local(Local(module))
        elif isinstance(module, nn.GroupNorm | nn.InstanceNorm2d):
            if isinstance(module, nn.InstanceNorm2d) and module.track_running_stats:
                self.local(Pointwise(module))
            else:
                self.norm(module)
        elif isinstance(module, nn.Conv2d):
            self.local(Conv(module))
        elif isinstance(module, blocks.Upsample):
            self.local(Upsample(module))
        elif isinstance(module, nn.Module) and _pointwise(module):
            self.local(Pointwise(module))
        elif not isinstance(module, nn.Module):
            self.local(Pointwise(module))  # a function: the output activation
        else:
            raise NotTileable(f"a {type(module).__name__} block")


_POINTWISE = (nn.Identity, nn.Dropout, nn.BatchNorm2d, nn.ReLU, nn.SiLU, nn.LeakyReLU, nn.GELU,
              nn.Tanh, nn.Sigmoid, nn.ELU)  # fmt: skip


def _pointwise(module: nn.Module) -> bool:
    return isinstance(module, _POINTWISE)


def plan(parts: list, zoom: Fraction = Fraction(1)) -> Plan:
    """The stages that run `parts` (modules, and functions of one tensor applied pixel by
    pixel) in sequence on an input of `zoom` pixels per image pixel (a latent: 1 / factor);
    NotTileable for a part that is not fully convolutional."""
    builder = _Builder(zoom)
    for part in parts:
        builder.module(part)
    result = builder.park()
    return Plan(builder.stages, builder.zooms, builder.stats, result)


def context(stages: Plan, length: int = 4096) -> int:
    """The most image pixels across that one output pixel of any stage depends on (its
    receptive field along an axis, measured in the middle of an input of `length` pixels):
    what each tile computes beyond its own pixels."""
    widest = 0
    for stage in stages.stages:
        if stage.whole is not None:  # whole-tensor, not tiled
            continue
        n = max(1, int(length * stages.zooms[stage.source]))
        lengths, sides = [], {}
        for i, op in enumerate(stage.ops):
            lengths.append(n)
            if isinstance(op, Add):
                m = max(1, int(length * stages.zooms[op.source]))
                sides[i] = []
                for side_op in op.ops:
                    sides[i].append(m)
                    m = side_op.size(m, 0)
                continue
            n = op.size(n, 0)
        middle = n // 2
        _, (lo, hi) = _axis(stage.ops, lengths, middle, middle + 1, 0, {}, sides)
        widest = max(widest, math.ceil((hi - lo) / stages.zooms[stage.source]))
    return widest


# -- the run ---------------------------------------------------------------------------------


class Parking:
    """Where whole tensors wait between stages: host memory while their bytes stay within
    `budget`, beyond it files in the temporary folder ($TMPDIR), mapped into memory (the
    system writes their pages out as it needs room) and unlinked as soon as they are mapped,
    so that no file stays behind, not even after a kill."""

    def __init__(self, budget: int | None):
        self.budget, self.used, self.files = budget, 0, 0
        self._held: dict[int, int] = {}  # id of a parked tensor -> its bytes in host memory

    def empty(self, shape: tuple, dtype: torch.dtype, memory_format) -> torch.Tensor:
        size = math.prod(shape) * dtype.itemsize
        if self.budget is None or self.used + size <= self.budget:
            tensor = torch.empty(shape, dtype=dtype, memory_format=memory_format)
            self.used += size
            self._held[id(tensor)] = size
            return tensor
        self.files += 1
        return _mapped(shape, dtype, memory_format)

    def store(self, tensor: torch.Tensor, memory_format) -> torch.Tensor:
        """A parked copy of a (device) tensor."""
        parked = self.empty(tuple(tensor.shape), tensor.dtype, memory_format)
        parked.copy_(tensor)
        return parked

    def release(self, tensor: torch.Tensor | None) -> None:
        if tensor is not None:
            self.used -= self._held.pop(id(tensor), 0)


def _mapped(shape: tuple, dtype: torch.dtype, memory_format) -> torch.Tensor:
    """An empty tensor whose storage is a new file in the temporary folder, mapped and
    unlinked; one line naming the folder where it has no room."""
    count = math.prod(shape)
    handle, name = tempfile.mkstemp(prefix="aecli-tiles-")
    try:
        try:
            os.posix_fallocate(handle, 0, max(1, count * dtype.itemsize))  # room, now or never
        except OSError as exc:
            raise ParkingError(
                f"{tempfile.gettempdir()}: no room for {count * dtype.itemsize / 1e9:.1f} GB of "
                f"activations waiting between tiles ({exc.strerror}); set TMPDIR to a folder "
                "with room, or pass --tile-fast"
            ) from None
        flat = torch.from_file(name, shared=True, size=count, dtype=dtype)
    finally:
        os.close(handle)
        os.unlink(name)
    if memory_format == LAST and len(shape) == 4:
        b, c, h, w = shape
        return flat.view(b, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


class ParkingError(AecliError):
    """The temporary folder has no room for the whole tensors that wait between stages."""


@dataclass
class Tile:
    core: tuple[int, int, int, int]  # y0, y1, x0, x1 of the stage's output
    crops: dict[int, tuple[int, int, int, int]]  # source tensor -> its crop
    key: tuple  # the per-operation parameters; equal keys run as one batch


def _axis(ops: list[Op], lengths: list[int], a: int, b: int, axis: int, side: dict, sides):
    """Walk one axis backwards from outputs [a, b): each operation's parameters, and the
    range of the stage's input (and of each residual source, in `side`) they depend on."""
    found: list = [None] * len(ops)
    for i in range(len(ops) - 1, -1, -1):
        op, n = ops[i], lengths[i]
        if isinstance(op, Add):
            sub, (lo, hi) = _axis(op.ops, sides[i], a, b, axis, {}, None)
            side[i] = (lo, hi)
            found[i] = tuple(sub) + (hi - lo,)
            continue
        lo, hi = op.need(a, b, n, axis)
        found[i] = op.params(lo, hi, a, b, n, axis) + (hi - lo,)
        a, b = lo, hi
    return found, (a, b)


class Runner:
    """Runs a plan on one input tensor (1, C, H, W) in tiles that cover `tile` x `tile` image
    pixels at every stage (so 64 x 64 latent pixels for tiles of 512 in an f8 model)."""

    def __init__(
        self,
        plan: Plan,
        tile: int,
        *,
        device: torch.device,
        batch: int,
        memory_format: torch.memory_format = torch.contiguous_format,
        notify: Callable[[str], None] = lambda _message: None,
        attention_fits: Callable[[int], bool] = lambda _bytes: True,
        host_budget: int | None = None,
    ):
        """`attention_fits(bytes)`: whether whole-tensor attention may take that much device
        memory. `host_budget`: the bytes of host memory whole tensors may take (None: no
        limit); beyond it they wait in files (see Parking)."""
        self.plan, self.tile, self.device, self.batch = plan, tile, device, max(1, batch)
        self.memory_format, self.notify, self.attention_fits = memory_format, notify, attention_fits
        # Whole tensors wait in host memory: on a GPU, device memory then follows the tile.
        self.parking = Parking(host_budget)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tensors: dict[int, torch.Tensor] = {0: x}
        stats: dict[int, dict[str, object]] = {}
        if 0 in self.plan.stats:
            stats[0] = {name: make() for name, make in self.plan.stats[0].items()}
            for reducer in stats[0].values():
                reducer.add(x)
        last = {}
        for index, stage in enumerate(self.plan.stages):
            last[stage.source] = index
            for op in stage.ops:
                if isinstance(op, Add):
                    last[op.source] = index
        for index, stage in enumerate(self.plan.stages):
            makers = self.plan.stats.get(stage.out, {})
            reducers = [make() for make in makers.values()]
            if reducers:
                stats[stage.out] = dict(zip(makers, reducers, strict=True))
            if stage.whole is not None:
                out = self._whole(stage, tensors[stage.source], stats.get(stage.source, {}))
                for reducer in reducers:
                    reducer.add(out)
                tensors[stage.out] = self.parking.store(out, self.memory_format)
            else:
                tensors[stage.out] = self._stage(stage, tensors, stats, reducers)
            for name in [n for n, i in last.items() if i == index and n != self.plan.result]:
                self.parking.release(tensors.pop(name, None))
                stats.pop(name, None)
        return tensors[self.plan.result].to(self.device)

    def _stage(self, stage: Stage, tensors: dict, stats: dict, reducers: list):
        source = tensors[stage.source]
        lengths: list[tuple[int, int]] = []
        sides: dict[int, list] = {}
        h, w = source.shape[-2:]
        for i, op in enumerate(stage.ops):
            lengths.append((h, w))
            if isinstance(op, Add):
                sh, sw = tensors[op.source].shape[-2:]
                sides[i] = []
                for side_op in op.ops:
                    sides[i].append((sh, sw))
                    sh, sw = side_op.size(sh, 0), side_op.size(sw, 1)
                if (sh, sw) != (h, w):
                    raise NotTileable(f"a residual sum of {sh}x{sw} and {h}x{w}")
                continue
            h, w = op.size(h, 0), op.size(w, 1)
        core = max(1, int(self.tile * self.plan.zooms[stage.out]))
        groups: dict[tuple, list[Tile]] = {}
        for y0 in range(0, h, core):
            for x0 in range(0, w, core):
                tile = self._tile(stage, lengths, sides, (y0, min(y0 + core, h)),
                                  (x0, min(x0 + core, w)))  # fmt: skip
                groups.setdefault(tile.key, []).append(tile)
        out = None
        for group in groups.values():
            for start in range(0, len(group), self.batch):
                chunk = group[start : start + self.batch]
                y = self._run_ops(stage, chunk, tensors, stats)
                if out is None:
                    out = self.parking.empty((1, y.shape[1], h, w), y.dtype, self.memory_format)
                for j, tile in enumerate(chunk):
                    y0, y1, x0, x1 = tile.core
                    out[:, :, y0:y1, x0:x1] = y[j : j + 1]
                for reducer in reducers:
                    reducer.add(y)  # a batch holds whole cores: their pixels, once each
        return out

    def _tile(self, stage: Stage, lengths, sides, rows, cols) -> Tile:
        side_rows: dict[int, tuple] = {}
        side_cols: dict[int, tuple] = {}
        per_rows, (ry0, ry1) = _axis(
            stage.ops, [n[0] for n in lengths], *rows, 0, side_rows,
            {i: [n[0] for n in s] for i, s in sides.items()},
        )  # fmt: skip
        per_cols, (rx0, rx1) = _axis(
            stage.ops, [n[1] for n in lengths], *cols, 1, side_cols,
            {i: [n[1] for n in s] for i, s in sides.items()},
        )  # fmt: skip
        crops = {-1: (ry0, ry1, rx0, rx1)}
        for i in side_rows:
            crops[i] = (*side_rows[i], *side_cols[i])
        return Tile((*rows, *cols), crops, (tuple(per_rows), tuple(per_cols)))

    def _crop(self, tensor: torch.Tensor, tiles: list[Tile], which: int) -> torch.Tensor:
        parts = [tensor[..., a:b, c:d] for a, b, c, d in (t.crops[which] for t in tiles)]
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        x = x.to(self.device)
        if self.memory_format != torch.contiguous_format:
            x = x.contiguous(memory_format=self.memory_format)
        return x  # a view where one tile's crop needs no copy: the next operation copies it

    def _run_ops(self, stage: Stage, tiles: list[Tile], tensors: dict, stats: dict):
        rows, cols = tiles[0].key
        x = self._crop(tensors[stage.source], tiles, -1)
        context = {"stats": stats}
        for i, op in enumerate(stage.ops):
            if isinstance(op, Add):
                s = self._crop(tensors[op.source], tiles, i)
                for j, side_op in enumerate(op.ops):
                    s = side_op.run(s, rows[i][j][:-1], cols[i][j][:-1], context)
                x = x + s
            else:
                x = op.run(x, rows[i][:-1], cols[i][:-1], context)
        return x

    def _whole(self, stage: Stage, x: torch.Tensor, stats: dict) -> torch.Tensor:
        """A whole-tensor stage: an attention block over the whole tensor (per tile,
        approximately, where even that would not fit), or a block's function."""
        module = stage.whole
        if not isinstance(module, blocks.Attention):
            return module(x.to(self.device).contiguous(memory_format=self.memory_format))
        c, h, w = x.shape[1:]
        # the input, its normalised copy, q, k, v, the attention's output and the projection
        need = 7 * c * h * w * 4
        if self.attention_fits(need):
            return module(x.to(self.device).contiguous(memory_format=self.memory_format))
        self.notify(
            f"warning: attention over a {h}x{w} latent would need about {need / 1e9:.1f} GB on "
            f"{self.device}: running it tile by tile instead, so the result is approximate"
        )
        mean, var = stats["moments"].groups(module.norm.num_groups)
        core = max(1, int(self.tile * self.plan.zooms[stage.source]))
        out = torch.empty_like(x)
        norm = module.norm
        for y0 in range(0, h, core):
            for x0 in range(0, w, core):
                part = x[..., y0 : y0 + core, x0 : x0 + core].to(self.device)
                normalised = normalise(part, mean, var, norm.eps, norm.weight, norm.bias)
                out[..., y0 : y0 + core, x0 : x0 + core] = part + module.attend(normalised)
        return out
