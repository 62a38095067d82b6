"""Where a model runs and in which precision: every `--device` and `--dtype` is resolved here.

`auto` means CUDA in bf16 (fp16 where the GPU has no bf16) when torch sees a GPU, else the CPU in fp32.
Apple's MPS is used only when asked for. A device that is asked for and absent is a one-line error,
never a quiet fall back to the CPU. A model too large for one GPU is spread over all visible GPUs with
transformers' `device_map="auto"` (what lm-evaluation-harness's `parallelize=True` does).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import PortLLMError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_HELP = "auto (CUDA in bf16 when present, else CPU fp32), cpu, cuda, cuda:N or mps"
DTYPE_HELP = "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16"
GPU_HEADROOM = 0.85  # share of a GPU's free memory the weights may take before the model is spread


@dataclass(frozen=True)
class Placement:
    """A resolved device and dtype; `spread` when the weights go over every visible GPU."""

    device: str  # "cpu", "cuda:0", "mps"
    dtype: str  # "float32", "bfloat16", "float16"
    spread: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def __str__(self) -> str:
        return f"{'every GPU' if self.spread else self.device}, {self.dtype}"


def resolve_device(device: str = "auto") -> str:
    """`auto|cpu|cuda|cuda:N|mps` -> a concrete torch device string, or a one-line error if it is absent."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m:
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else "sees no GPU"
            raise PortLLMError(f"--device {device}: torch {torch.__version__} {built}; use --device cpu or auto")
        index = int(m.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise PortLLMError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
        return f"cuda:{index}"
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise PortLLMError(f"--device {device}: this torch has no usable Apple MPS backend; use --device cpu")
        return "mps"
    raise PortLLMError(f"--device {device!r}: use {', '.join(DEVICES)}")


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` -> bf16 on a CUDA GPU that has it (else fp16), fp16 on MPS, fp32 on the CPU."""
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float16" if device == "mps" else "float32"
    if name not in DTYPES:
        raise PortLLMError(f"--dtype {dtype!r}: use {', '.join(DTYPES)}")
    return name


BF16_IF_NATIVE = "bfloat16-if-native"  # a study's training dtype: bf16 where the device runs it natively, else fp32


def native_bf16(device: str) -> bool:
    """Does `device` run bf16 matrix products natively: a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16?
    Elsewhere torch emulates them: on a 2-core AVX2 CPU here, bf16 training ran over 8x slower than fp32."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    probes = (getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(bool(f()) for f in probes if f is not None)


def training_dtype(dtype: str, device: str) -> str:
    """`bfloat16-if-native` -> bfloat16 where `device` runs it natively (native_bf16), else float32; any other
    value is resolve_dtype's. Studies train in it (their reports record the concrete dtype)."""
    if dtype == BF16_IF_NATIVE:
        return "bfloat16" if native_bf16(device) else "float32"
    return resolve_dtype(dtype, device)


def weight_bytes(shapes: list[tuple[int, ...]], dtype: str) -> int:
    """What the weights take in `dtype`: the sum of every tensor's elements times the element size."""
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return sum(math.prod(s) for s in shapes) * size


def place(device: str = "auto", dtype: str = "auto", weight_bytes: int | None = None) -> Placement:
    """Resolve both; with `weight_bytes` (the model's size in that dtype), spread it over the GPUs when one
    GPU's free memory cannot hold it and more than one is visible (`cuda` or `auto` only, not `cuda:N`)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    spread = False
    explicit_index = ":" in (device or "")
    if dev.startswith("cuda") and weight_bytes and not explicit_index and torch.cuda.device_count() > 1:
        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        spread = weight_bytes > GPU_HEADROOM * free
    return Placement(dev, dt, spread)
