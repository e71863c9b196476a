"""FreeU's math for the Collaborative Diffusion UNets (host-free, tested without ComfyUI); the node that patches a
MODEL with it is ``nodes_freeu.CollabFreeU``."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

#: The reference's FreeU defaults (freeu/*_freeu.py of the authors' repository).
FREEU_DEFAULTS = {"b1": 1.1, "b2": 1.2, "s1": 1.0, "s2": 1.0}


def freeu_scales(model_channels: int, channel_mult: Sequence[int], b1: float, b2: float, s1: float,
                 s2: float) -> dict[int, tuple[float, float]]:
    """Decoder feature width → (backbone factor b, skip factor s) for FreeU.

    FreeU scales the decoder stages of the two levels below the deepest one: b1/s1 for the width of level
    L−2, b2/s2 for level L−3. For the official 192-channel UNet ([1,2,3,5]) that is 576 → (b1,s1) and
    384 → (b2,s2), exactly the authors' FreeU; for SD's [1,2,4,4] it gives the stock node's 4·C and 2·C.
    """
    mult = [int(m) for m in channel_mult]
    scales: dict[int, tuple[float, float]] = {}
    if len(mult) >= 2:
        scales[int(model_channels) * mult[-2]] = (float(b1), float(s1))
    if len(mult) >= 3:
        scales.setdefault(int(model_channels) * mult[-3], (float(b2), float(s2)))
    return scales


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the central (low) frequencies of each [H, W] plane by ``scale`` (FreeU's skip filter).

    The spectrum is centred with fftshift, a ``2·threshold`` square around the centre is multiplied by
    ``scale``, and the real part of the inverse transform is returned in ``x``'s dtype.
    """
    if scale == 1.0:
        return x
    spec = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = spec.shape[-2:]
    cy, cx = h // 2, w // 2
    gain = torch.ones(spec.shape[-2:], device=spec.device, dtype=torch.float32)
    gain[max(cy - threshold, 0):cy + threshold, max(cx - threshold, 0):cx + threshold] = scale
    spec = spec * gain
    out = torch.fft.ifftn(torch.fft.ifftshift(spec, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


def freeu_apply(h: torch.Tensor, skip: torch.Tensor, scales: Mapping[int, tuple[float, float]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU on one decoder step: the first half of ``h``'s channels × b, the skip's low frequencies × s."""
    got = scales.get(int(h.shape[1]))
    if got is None:
        return h, skip
    b, s = got
    half = h.shape[1] // 2
    h = torch.cat([h[:, :half] * b, h[:, half:]], dim=1)
    return h, fourier_filter(skip, 1, s)
