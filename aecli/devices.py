"""Where the model runs and how: device choice, bf16 autocast, memory format, determinism, and
a batch's way in (uint8 to the model's range). Nothing here imports aecli.data: data uses this.

Training and inference share these so that a model runs the same way in both.

A device is resolved once, to an indexed one (`cpu:0`, `cuda:1`), and devices are compared with
`same_device`, never with `==`: `torch.device("cuda") != torch.device("cuda:0")` and
`torch.device("cpu:0") != torch.device("cpu")` (what a CPU tensor reports), so `==` would call
two names of one device different. And tensors go to `placed(device)`: `Tensor.to(cpu:0)`
copies a CPU tensor whole, every time (a loaded model's every weight), where `to(cpu)` keeps it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from aecli import CUBLAS_WORKSPACE
from aecli.errors import UsageError


def _index(device: torch.device) -> int:
    """A device's index, with the implicit one filled in (the current CUDA device; 0 for cpu)."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: same type and same index, implicit indices filled in."""
    return a.type == b.type and _index(a) == _index(b)


def placed(device: torch.device) -> torch.device:
    """The device to give `.to(...)` for a resolved `device`: the CPU under the name its tensors
    report, `cpu`, for which a CPU tensor is already in place (`cpu:0` is another name, and
    `.to(cpu:0)` copies); any other device as it is."""
    return torch.device("cpu") if device.type == "cpu" else device


def torchrun_processes() -> tuple[int, int] | None:
    """(LOCAL_RANK, processes on this machine) under a torchrun of several processes, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return int(os.environ.get("LOCAL_RANK", "0")), local_world


def resolve_device(name: str | None) -> torch.device:
    """The indexed device that `--device NAME` means: `auto` (or None) picks CUDA when present;
    an explicit device must exist. Under torchrun each process takes `cuda:LOCAL_RANK`. A CUDA
    device also becomes the process's current one (`torch.cuda.set_device`): one process, one
    GPU."""
    name = (name or "auto").strip()
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(
                f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)"
            ) from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: aecli runs on cpu or cuda")
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise UsageError(f"--device {name}: there is one CPU device, cpu (or cpu:0)")
        return torch.device("cpu", 0)
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    ranks = torchrun_processes()
    if ranks is not None:
        local_rank, local_world = ranks
        if device.index is not None and local_world > 1:
            raise UsageError(
                f"--device {name}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                "pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES) or --device cpu"
            )
        if local_world > count:
            raise UsageError(
                f"--device {name}: torchrun started {local_world} processes on this machine but "
                f"{count} GPU{'s are' if count != 1 else ' is'} visible; start at most {count} "
                f"(--nproc_per_node={count}), or pass --device cpu to train on CPUs with gloo"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if _index(device) >= count:
        raise UsageError(
            f"--device {name}: no such GPU; this machine has {count} "
            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
        )
    device = torch.device("cuda", _index(device))
    # and the process's current device: whatever takes the implicit one (a bare
    # torch.cuda.synchronize(), current_stream(), a library) then means this GPU, not cuda:0
    torch.cuda.set_device(device)
    return device


def resolved(device: torch.device | str | None) -> torch.device:
    """A device as the engine and the Predictor take it: an indexed `torch.device` is one that
    resolve_device gave already and passes on as it is (resolving `cuda:1` again under
    torchrun would refuse it); a name, None or an unindexed device is resolved now."""
    if isinstance(device, torch.device):
        return device if device.index is not None else resolve_device(str(device))
    return resolve_device(device)


def describe(device: torch.device) -> str:
    """The device for reports: `cuda:0 (NVIDIA H100 80GB HBM3)` or `cpu (2 threads)`."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


# Dense bf16 tensor-core peaks (FLOP/s) from the makers' data sheets, by a name fragment of
# torch.cuda.get_device_name, most specific first: the denominator of MFU.
_BF16_PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere).

    Batches of many shapes (native sizes, aspect buckets, a unit's last batches) leave glibc's
    heap fragmented: freed blocks of one size do not serve the next shape's, and the heap grows
    with the number of shapes seen (measured: 575 MB to 1.2 GB over 192 shapes, without end).
    Called once per unit of work, it keeps a long encode's memory flat for a few ms a call."""
    global _trim
    if _trim is None:
        try:
            import ctypes

            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None  # glibc's malloc_trim once looked up; False where there is none


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on a device: on a GPU its free memory plus what PyTorch's
    caching allocator holds but does not use (reserved, not allocated: it serves new tensors
    first, and the driver counts it as used); on the host its available memory (Linux's
    MemAvailable, else the free pages); None where it cannot be told."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + max(0, cached)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every OS tells
        return None


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's peak FLOP/s for the tensor-core work a run does: bf16 under bf16 autocast,
    TF32 without it (half the bf16 peak on every GPU listed); None where it is not known (the
    CPU, an unlisted GPU), so that no MFU is guessed."""
    if device.type != "cuda":
        return None
    peak = peak_for_name(torch.cuda.get_device_name(device))
    if peak is None:
        return None
    return peak if dtype == torch.bfloat16 else peak / 2


def peak_for_name(name: str) -> float | None:
    return next((peak for fragment, peak in _BF16_PEAKS if fragment in name), None)


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

# bf16 autocast pays where a model's convolutions outweigh the casts it adds: on mnist-cae
# (0.001 GFLOPs per image) autocast added about 130 cast kernels to a step and made the bare loop
# 4.2 ms instead of 3.2 ms on an H100 (issue 13), while on kl-f8 (895 GFLOPs) bf16 is what
# reaches the tensor cores' peak. Below this forward cost per image, CUDA runs fp32 on TF32
# tensor cores instead.
BF16_FROM_GFLOPS = 0.25


@dataclass(frozen=True)
class ModelCost:
    """What the execution policy needs to know about a model."""

    forward_flops: int  # one image's forward pass
    group_norm: bool  # has GroupNorm layers

    @classmethod
    def of(cls, config, model: torch.nn.Module | None = None) -> ModelCost:
        """The cost of a config's model: FLOPs by arithmetic, the layers from `model` (that
        model, already built) or from one built on the meta device (no memory, no compute)."""
        from aecli.models import build_model, forward_flops

        model = model if model is not None else build_model(config, meta=True)
        group_norm = any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
        return cls(forward_flops(config), group_norm)


# bf16 and TF32 tensor cores arrived with compute capability 8.0 (Ampere): older GPUs (V100,
# T4) emulate bf16, slower than their fp32, and have no TF32.
TENSOR_CORE_CAPABILITY = (8, 0)


def has_bf16_tensor_cores(device: torch.device) -> bool:
    """Whether a CUDA device has bf16 and TF32 tensor cores (compute capability 8.0 or more)."""
    return tuple(torch.cuda.get_device_capability(device)) >= TENSOR_CORE_CAPABILITY


def execution_plan(
    kind: str,
    precision: str,
    memory_format: str,
    cost: ModelCost | None = None,
    *,
    bf16_cores: bool = True,
) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None, memory format name) for `precision` and `memory_format` as a
    config gives them, on a device of type `kind` (cpu, cuda); `bf16_cores` says whether that
    CUDA device has bf16 tensor cores (has_bf16_tensor_cores: `auto` stays fp32 without them).

    `auto` on the CPU: fp32, channels-last (oneDNN's convolutions are faster on it: on the 2-core
    dev machine, training 1.0x to 1.5x and the model alone 1.1x to 1.5x the images/s of
    contiguous tensors over the bundled presets, and never measurably slower). `auto` on CUDA:
    bf16 autocast where the forward pass costs at least BF16_FROM_GFLOPS per image (or the cost
    is not known), else fp32 (TF32); channels-last, except for models with GroupNorm, where
    channels-last made the kl-f8 VAE slower (51.7 against 68.9 images/s on an H100, issue 13).
    A GPU older than compute capability 8.0 runs `auto` in fp32."""
    cuda = kind == "cuda"
    if precision == "auto":
        big = cost is None or cost.forward_flops >= BF16_FROM_GFLOPS * 1e9
        precision = "bf16" if cuda and bf16_cores and big else "fp32"
    if memory_format == "auto":
        group_norm = cost is not None and cost.group_norm
        memory_format = "contiguous" if cuda and group_norm else "channels_last"
    return (torch.bfloat16 if precision == "bf16" else None), memory_format


def to_model_range(
    batch: torch.Tensor,
    value_range: str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1] (unit) or [-1, 1] (symmetric), in
    `memory_format`. The layout changes last: on the CPU converting to float and re-laying out
    in one copy took 1.4 to 1.6 times as long as the two apart."""
    x = batch.to(torch.float32)
    # v / 127.5 is exactly 2 * (v / 255): doubling commutes with rounding to float
    x = x.div_(127.5).sub_(1.0) if value_range == "symmetric" else x.div_(255.0)
    return x.contiguous(memory_format=memory_format)


class Execution:
    """How a model runs on a device: bf16 autocast or fp32, and the memory format, as
    `execution_plan` resolves the config's `precision` and `memory_format`. On a CUDA device
    with tensor cores (compute capability 8.0 or more), fp32 matrix products and convolutions use
    TF32 (`torch.backends.cuda.matmul`; cuDNN's default for convolutions)."""

    def __init__(
        self,
        device: torch.device,
        precision: str,
        memory_format: str = "auto",
        cost: ModelCost | None = None,
    ):
        self.device, self.cost = device, cost
        self.tensor_cores = device.type == "cuda" and has_bf16_tensor_cores(device)
        self.autocast_dtype, format_name = execution_plan(
            device.type, precision, memory_format, cost, bf16_cores=self.tensor_cores
        )
        self.memory_format, self.layout = MEMORY_FORMATS[format_name], format_name
        if self.tensor_cores:  # CUDA's matrix products only (the CPU's stay as they are)
            torch.backends.cuda.matmul.allow_tf32 = True

    @classmethod
    def for_config(cls, device: torch.device, config) -> Execution:
        """The execution of a config's model; its cost is counted only where the policy needs
        it (CUDA with an `auto` setting)."""
        train = config.train
        auto = "auto" in (train.precision, train.memory_format)
        cost = ModelCost.of(config) if device.type == "cuda" and auto else None
        return cls(device, train.precision, train.memory_format, cost)

    def describe(self) -> str:
        """`bf16 autocast, channels-last` or `fp32, contiguous` (TF32 on CUDA)."""
        return describe_plan(
            self.device.type, self.autocast_dtype, self.layout, tf32=self.tensor_cores
        )

    @property
    def pins_memory(self) -> bool:
        """Whether host batches for this device belong in pinned memory (CUDA's copies from it
        do not block the host)."""
        return self.device.type == "cuda"

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor on the device; from the CPU to CUDA through pinned memory (pinned here
        unless the loader pinned it), without blocking the host (the copy is ordered on the
        current stream before any use of its result)."""
        if same_device(tensor.device, self.device):
            return tensor
        if self.pins_memory and tensor.device.type == "cpu":
            if not tensor.is_pinned():
                tensor = tensor.pin_memory()
            return tensor.to(self.device, non_blocking=True)
        return tensor.to(placed(self.device))

    @staticmethod
    def to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Callable[[], None]]:
        """Host copies of device tensors, started without blocking the host (into pinned
        memory, after the work that computes them), and the function that waits for them:
        meanwhile the host can decode, launch the next batch or write files. CPU tensors come
        back as they are. The wait covers the tensors' own GPU, also where it is not the
        process's current one (`--device cuda:1`: the copies queue on that GPU's stream)."""
        if not tensors or tensors[0].device.type != "cuda":
            return tensors, lambda: None
        copies = [
            torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for t in tensors
        ]
        done = torch.cuda.Event(blocking=True)  # the host sleeps in the wait instead of spinning
        done.record(torch.cuda.current_stream(tensors[0].device))
        return copies, done.synchronize

    def prepare(self, images: torch.Tensor, value_range: str) -> torch.Tensor:
        """uint8 (B, C, H, W) anywhere -> model-range floats on the device, in its memory
        format."""
        return to_model_range(self.to_device(images), value_range, self.memory_format)

    def optimizer_options(self) -> dict:
        """Adam's keyword for this device: fused on CUDA (one kernel for every parameter). Not
        on the CPU: there it was 4-6% faster for the cifar presets, but of 18 seeds of
        cifar-cae on photo crops 7 ended below 25.5 dB held-out PSNR with it against 1 with
        the default implementation (docs/benchmarks.md), for reasons not understood."""
        return {"fused": True} if self.device.type == "cuda" else {}

    def autocast(self, *, cache: bool = True) -> contextlib.AbstractContextManager:
        """bf16 autocast where the plan has it (`cache` off for a step a CUDA graph captures:
        autocast's cast cache cannot outlive the capture)."""
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype,
            enabled=self.autocast_dtype is not None,
            cache_enabled=cache,
        )


def describe_plan(
    kind: str, autocast_dtype: torch.dtype | None, layout: str, *, tf32: bool = True
) -> str:
    """How a model runs on a device of type `kind`: `bf16 autocast, channels-last`,
    `fp32 (TF32), contiguous` (CUDA with tensor cores) or `fp32, channels-last` (CPU)."""
    precision = "bf16 autocast" if autocast_dtype is not None else "fp32"
    if precision == "fp32" and kind == "cuda" and tf32:
        precision = "fp32 (TF32)"
    return f"{precision}, {layout.replace('_', '-')}"


# PyTorch's scaled-dot-product attention backends other than the math one (flash, memory
# efficient, cuDNN): their backward passes are not deterministic on CUDA.
_FAST_ATTENTION = ("flash", "mem_efficient", "cudnn")

NOT_DETERMINISTIC = "does not have a deterministic implementation"


@contextlib.contextmanager
def deterministic(enabled: bool, *, autotune: bool = False) -> Iterator[None]:
    """Deterministic algorithms while the block runs (and the previous settings after it):
    `torch.use_deterministic_algorithms(True)`, so that an operation without a deterministic
    kernel raises (RuntimeError naming it, see NOT_DETERMINISTIC) instead of warning; attention
    on the math backend; cuDNN autotuning off and cuDNN's deterministic algorithms; and the
    cuBLAS workspace setting. Otherwise, with `autotune` (training's fixed shapes on CUDA),
    cuDNN benchmarks its algorithms for each shape once and keeps the fastest."""
    cudnn = torch.backends.cudnn
    if not enabled:
        previous_benchmark = cudnn.benchmark
        cudnn.benchmark = previous_benchmark or autotune
        try:
            yield
        finally:
            cudnn.benchmark = previous_benchmark
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
    )
    attention = {
        name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
        for name in _FAST_ATTENTION
        if hasattr(torch.backends.cuda, f"enable_{name}_sdp")
    }
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    cudnn.benchmark, cudnn.deterministic = False, True
    for name in attention:
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        cudnn.benchmark, cudnn.deterministic = previous[2], previous[3]
        for name, on in attention.items():
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
