"""Which floating-point type the networks run in: ``float32`` (the default), ``bfloat16``, ``float16`` or ``auto``.

``auto`` is chosen from what the hardware *does*, never from a model or machine name:

* CUDA: ``bfloat16`` where ``torch.cuda.is_bf16_supported()`` (Ampere and later), else ``float16``;
* CPU: ``bfloat16`` where the CPU has native bf16 dot products (x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``,
  read from ``/proc/cpuinfo``), else ``float32``;
* MPS: ``float16``; anything else: ``float32``.

Only the networks' weights and activations take the reduced type (no autocast). The sampler's arithmetic stays in
float32 whatever the networks run in — see :meth:`collab_core.pipeline.CollaborativePipeline.step`.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Union

import torch

from .errors import CollabError

log = logging.getLogger(__name__)

CHOICES = ("float32", "bfloat16", "float16", "auto")
_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "single": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
DTypeLike = Union[str, torch.dtype, None]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).split(".")[-1]


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    """The CPU feature flags of /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bfloat16 natively (AVX512-BF16, AMX-BF16 or Arm BF16) and torch's oneDNN
    backend can use it; bf16 elsewhere is emulated and slower than float32."""
    if not torch.backends.mkldnn.is_available():
        return False
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & _cpu_flags())


def cpu_has_native_fp16() -> bool:
    """True where the CPU computes float16 natively (AVX512-FP16, AMX-FP16 or Arm half-precision arithmetic)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return bool({"avx512_fp16", "amx_fp16", "asimdhp"} & _cpu_flags())


def _parse(name: DTypeLike) -> Optional[torch.dtype]:
    """A torch dtype, or None for ``auto``."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.bfloat16, torch.float16):
            raise CollabError(f"dtype {name} is not one the networks can run in; choose one of {', '.join(CHOICES)}")
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _ALIASES:
        raise CollabError(f"unknown dtype {name!r}; choose one of {', '.join(CHOICES)}")
    return _ALIASES[key]


def auto_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """The fastest type that keeps the pictures (docs/precision.md) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if device.type == "mps":
        return torch.float16
    return torch.float32


def resolve_dtype(name: DTypeLike, device: Union[str, torch.device] = "cpu") -> torch.dtype:
    """``name`` (a string of :data:`CHOICES` or an alias such as ``bf16``/``half``, a torch dtype, or None =
    float32) for ``device``; raises :class:`CollabError`, with the fix, for a type the device cannot run."""
    device = torch.device(device)
    dtype = _parse(name)
    if dtype is None:
        dtype = auto_dtype(device)
        log.info("dtype auto -> %s on %s", dtype_name(dtype), device)
        return dtype
    if device.type == "cpu" and dtype == torch.float16 and not cpu_has_native_fp16():
        alt = "bfloat16 (native on this CPU)" if cpu_has_native_bf16() else "float32"
        raise CollabError(f"float16 on this CPU has no native arithmetic (no AVX512-FP16/AMX-FP16): its convolutions "
                          f"are emulated, slow or missing. Use --dtype {alt.split()[0]} ({alt}), --dtype auto, or a GPU "
                          "(--device cuda)")
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        log.warning("this CPU has no native bfloat16 arithmetic (no AVX512-BF16/AMX-BF16): bfloat16 is emulated and "
                    "likely slower than float32 here; --dtype auto picks float32")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise CollabError("this GPU has no bfloat16 support (torch.cuda.is_bf16_supported() is False: before "
                          "Ampere); use --dtype float16 (or --dtype auto)")
    return dtype
