"""Where the model runs and how: device choice, bf16 autocast, memory format, determinism.

Training and inference share these so that a model runs the same way in both.

A device is resolved once, to an indexed one (`cpu:0`, `cuda:1`), and devices are compared with
`same_device`, never with `==`: `torch.device("cuda") != torch.device("cuda:0")` and
`torch.device("cpu:0") != torch.device("cpu")` (what a CPU tensor reports), so `==` would call
two names of one device different.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from aecli.data.transforms import to_model_range
from aecli.errors import UsageError


def _index(device: torch.device) -> int:
    """A device's index, with the implicit one filled in (the current CUDA device; 0 for cpu)."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: same type and same index, implicit indices filled in."""
    return a.type == b.type and _index(a) == _index(b)


def torchrun_processes() -> tuple[int, int] | None:
    """(LOCAL_RANK, processes on this machine) under a torchrun of several processes, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return int(os.environ.get("LOCAL_RANK", "0")), local_world


def resolve_device(name: str | None) -> torch.device:
    """The indexed device that `--device NAME` means: `auto` (or None) picks CUDA when present;
    an explicit device must exist. Under torchrun each process takes `cuda:LOCAL_RANK`."""
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
    return torch.device("cuda", _index(device))


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


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on a device: the GPU's free memory, or the host's available
    memory (Linux's MemAvailable, else the free pages); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
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
    """The device's peak FLOP/s for bf16 tensor-core work; None where it is not known (the
    CPU, another precision, an unlisted GPU), so that no MFU is guessed."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    return next((peak for fragment, peak in _BF16_PEAKS if fragment in name), None)


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


class Execution:
    """bf16 autocast (precision `bf16`, or `auto` on CUDA) and the memory format (`auto`:
    channels-last on CUDA)."""

    def __init__(self, device: torch.device, precision: str, memory_format: str = "auto"):
        self.device = device
        cuda = device.type == "cuda"
        use_bf16 = precision == "bf16" or (precision == "auto" and cuda)
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        if memory_format == "auto":
            memory_format = "channels_last" if cuda else "contiguous"
        self.memory_format = MEMORY_FORMATS[memory_format]

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor on the device; from the CPU to CUDA through pinned memory, without blocking
        the host (the copy is ordered on the current stream before any use of its result)."""
        if same_device(tensor.device, self.device):
            return tensor
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            if not tensor.is_pinned():
                tensor = tensor.pin_memory()
            return tensor.to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def prepare(self, images: torch.Tensor, value_range: str) -> torch.Tensor:
        """uint8 (B, C, H, W) anywhere -> model-range floats on the device, in its memory
        format."""
        x = to_model_range(self.to_device(images), value_range)
        return x.contiguous(memory_format=self.memory_format)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms while the block runs (and the previous settings after it):
    `torch.use_deterministic_algorithms` (a warning where an operation has no deterministic
    version), cuDNN autotuning off, and the cuBLAS workspace setting that CUDA needs for
    reproducible matrix products (effective when set before the process's first one)."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
    )
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        cudnn.benchmark, cudnn.deterministic = previous[2], previous[3]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
