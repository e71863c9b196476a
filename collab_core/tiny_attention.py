"""Exact attention for many heads of tiny width on an AVX-512 CPU: our kernel, built once, and its diffusers
processor.

Why: the official networks use 32 heads at every level, so a dynamic diffuser's heads are 2-5 channels wide and a
UNet's 12-30. At those widths attention is one exp per query-key pair and a few multiply-adds; torch's CPU flash
kernel spends several times a vectorised exp per score on packing GEMM blocks, and costs the same in bfloat16 as
in float32 (it was 45 % of a bfloat16 collaborative step). ``kernels/tiny_head_attention.cpp`` computes the same
softmax(QKᵀ·scale)V exactly (the true maximum, float32 accumulation): float32 to 1e-6 of SDPA, bfloat16 within
bfloat16 SDPA's own error of float32.

The kernel is plain C++ with a C ABI, compiled with the system's C++ compiler the first time it is needed (about
3 s) into a per-user cache and called through ctypes; it shares torch's OpenMP runtime and thread count. Where
anything is missing (no compiler, a CPU without AVX-512, a GPU tensor, gradients needed, an attention mask) the
processor hands the call to diffusers' ``AttnProcessor2_0`` unchanged, so results never depend on the kernel
being there; :func:`unavailable_reason` says why it is not.

``CODIFF_ATTENTION=sdpa`` (or ``attention="sdpa"`` of :func:`use_tiny_head_attention` / ``load_pipeline``) keeps
SDPA everywhere. ``CODIFF_KERNEL_CACHE`` names the cache folder (default ``$XDG_CACHE_HOME`` or ``~/.cache``, then
``comfyui-collaborative-diffusion``); ``CXX`` the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .errors import ConfigError
from .precision import _cpu_flags

log = logging.getLogger(__name__)

__all__ = ["ATTENTION_CHOICES", "TinyHeadAttnProcessor", "attention", "needs_grad", "supports",
           "unavailable_reason", "use_tiny_head_attention"]

ATTENTION_CHOICES = ("auto", "sdpa")
SOURCE = Path(__file__).resolve().parent / "kernels" / "tiny_head_attention.cpp"
MAX_WIDTH = 32  # widest head the kernel is instantiated for (the official UNets' widest is 30)
_KEY_BLOCK = 32  # keys are padded to a multiple of this (two 16-lane registers per bfloat16 step)
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512dq", "-mavx512bf16", "-mfma"]
_CPU_NEEDS = {torch.float32: {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
              torch.bfloat16: {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}}


def _cache_dir() -> Path:
    if os.environ.get("CODIFF_KERNEL_CACHE"):
        return Path(os.environ["CODIFF_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "comfyui-collaborative-diffusion"


def _compile(compiler: str, target: Path) -> None:
    """Compile into a temporary file beside ``target`` and rename it, so concurrent processes never load a
    half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """(the library, None) or (None, the reason it is not available). Built at most once per process."""
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= _cpu_flags():
        return None, "the CPU has no AVX-512 (the kernel needs avx512f/bw/vl/dq)"
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        return None, "no C++ compiler found (install g++ or set CXX)"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the compiler {compiler} does not run: {e}"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = _cache_dir() / f"tiny_head_attention-{digest}.so"
    try:
        if not target.exists():
            log.info("building the tiny-head attention kernel into %s", target)
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"building {SOURCE.name} with {compiler} failed: {e}"
    fn = lib.tiny_head_attention
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 8 + [ctypes.c_float, ctypes.c_int])
    if lib.tiny_head_attention_max_width() < MAX_WIDTH:
        return None, f"{target} is older than its source; delete it"
    return lib, None


def unavailable_reason(dtype: torch.dtype = torch.float32) -> Optional[str]:
    """None when the kernel runs for ``dtype`` on this machine, else why not (for logs and the benchmark)."""
    if os.environ.get("CODIFF_ATTENTION", "auto") == "sdpa":
        return "CODIFF_ATTENTION=sdpa"
    if dtype not in _CPU_NEEDS:
        return f"no kernel for {dtype}"
    missing = _CPU_NEEDS[dtype] - _cpu_flags()
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    return _load()[1]


def supports(query: torch.Tensor, width: int) -> bool:
    """Whether :func:`attention` takes this call: a CPU tensor of a supported dtype, head width ≤ 32 and the kernel
    built. (It has no backward: callers ask :func:`needs_grad` too, and use SDPA where it says so.)"""
    return (query.device.type == "cpu" and 1 <= width <= MAX_WIDTH and query.dtype in _CPU_NEEDS
            and unavailable_reason(query.dtype) is None)


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a gradient will flow back through an attention whose result depends on ``tensors`` (inputs,
    weights; None ignored): training and Imagic's fine-tuning differentiate through attention, which the kernel
    cannot."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _pad_keys(x: torch.Tensor) -> torch.Tensor:
    """[..., M] → [..., Mp] with zero keys up to the block size (the kernel masks them out of the softmax)."""
    pad = -x.shape[-1] % _KEY_BLOCK
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
              scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v per head, for projections in their own layout: ``query`` [B, N, H·D], ``key`` and
    ``value`` [B, M, H·D]; returns [B, N, H·D] in ``query``'s dtype. The caller checks :func:`supports` first."""
    b, n, channels = query.shape
    m, width = key.shape[1], channels // heads
    scale = width ** -0.5 if scale is None else scale
    query = query.contiguous()
    key, value = key.to(query.dtype), value.to(query.dtype)  # the kernel reads one dtype
    per_head = lambda x: x.reshape(b, m, heads, width).permute(0, 2, 3, 1)  # noqa: E731  [B, H, D, M]
    values = _pad_keys(per_head(value)).contiguous()
    if query.dtype == torch.bfloat16:
        # channel pairs side by side per key, for one two-channel dot product per lane
        keys = per_head(key)
        if width % 2:
            keys = torch.nn.functional.pad(keys, (0, 0, 0, 1))
        keys = _pad_keys(keys)
        keys = keys.reshape(b, heads, keys.shape[2] // 2, 2, -1).transpose(-1, -2).contiguous()
    else:
        keys = _pad_keys(per_head(key)).contiguous()
    out = torch.empty(b, n, channels, dtype=torch.float32)
    status = _load()[0].tiny_head_attention(
        int(query.dtype == torch.bfloat16), query.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(),
        b, heads, n, m, values.shape[-1], width, n * channels, channels, float(scale), torch.get_num_threads())
    if status == 2:
        raise MemoryError(f"tiny-head attention: no memory for a {values.shape[-1]}-key score buffer")
    if status:  # an unsupported width, which supports() excludes
        raise ConfigError(f"tiny-head attention refused width {width}")
    return out.to(query.dtype)


class TinyHeadAttnProcessor:
    """A diffusers attention processor: plain self- or cross-attention (no mask, no group/spatial norm, no
    residual or output rescale, which the pack's networks never use) through :func:`attention` where
    :func:`supports` says so; every other call goes to ``AttnProcessor2_0`` as before."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()

    @staticmethod
    def _plain(attn, hidden_states, attention_mask, temb) -> bool:
        return (attention_mask is None and temb is None and hidden_states.ndim == 3
                and attn.spatial_norm is None and attn.group_norm is None and not attn.residual_connection
                and attn.rescale_output_factor == 1.0 and attn.norm_q is None and attn.norm_k is None
                and attn.norm_cross is None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        width = attn.inner_dim // attn.heads
        if not (self._plain(attn, hidden_states, attention_mask, temb) and supports(hidden_states, width)
                and not needs_grad(hidden_states, encoder_hidden_states, *attn.parameters())):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = attention(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads, attn.scale)
        return attn.to_out[1](attn.to_out[0](out))


def use_tiny_head_attention(model: torch.nn.Module, attention: str = "auto") -> int:
    """Give every diffusers ``Attention`` of ``model`` the :class:`TinyHeadAttnProcessor` (``"auto"``) or leave
    SDPA (``"sdpa"``). Returns how many layers took it. Harmless on a GPU or without the kernel (calls fall back)."""
    if attention not in ATTENTION_CHOICES:
        raise ConfigError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    if attention == "sdpa":
        return 0
    from diffusers.models.attention_processor import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    processor = TinyHeadAttnProcessor()
    for layer in layers:
        layer.set_processor(processor)
    return len(layers)
