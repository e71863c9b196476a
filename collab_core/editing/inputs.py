"""The inputs of an edit: the photo, its masks, its latent, and the region an edit may change.

* :func:`load_image` reads a picture (file, PIL, array, ComfyUI IMAGE) into a (1, 3, H, W) float tensor in [-1, 1],
  the way the reference's editing scripts do (``ToTensor`` then ``2x - 1``, no resize);
* :func:`check_sizes` refuses an image and masks of different sizes, naming both;
* :func:`encode_image` is the reference's ``get_first_stage_encoding``: ``scale_factor · posterior sample``, the
  sample drawn from a CPU generator (the reference draws it with ``torch.randn`` on the CPU) — or the posterior mean;
* :func:`edit_region` is where the target mask differs from the source mask, as a latent-resolution weight map.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import ConditioningError, ConfigError
from ..images import open_picture
from ..masks import load_mask

RGB_HELP = "convert it to an 8-bit RGB picture first (e.g. PIL: Image.open(path).convert('RGB').save('photo.png'))"


def vae_downscale(pipe) -> int:
    """Image pixels per latent pixel along one side (8 for the 512 models, 4 for the 256 ones)."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise ConfigError("editing a picture needs the VAE: give a *_vae file, or a uni-modal/collaborative file that "
                          "holds one")
    return 2 ** (len(vae.config.block_out_channels) - 1)


def native_image_size(pipe) -> int:
    """The picture size (pixels) the pipeline samples at: latent size × VAE downscale."""
    return int(pipe.latent_size) * vae_downscale(pipe)


# ------------------------------------------------------------------------------------------------ the photo


def load_image(src: Any) -> torch.Tensor:
    """A photo → float32 (1, 3, H, W) in [-1, 1].

    ``src``: a file path, a PIL image, a uint8 array (H, W, 3), a float array/tensor (H, W, 3) or a ComfyUI IMAGE
    (1, H, W, 3) in [0, 1]. Pictures that are not RGB (grey, palette, CMYK, 16-bit, transparent) are refused with
    the fix, rather than silently converted: a grey or palette file is often a mask given in the image's place.
    """
    name = None
    if isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        src = open_picture(src, "image")
    what = f"image {name}" if name else "the image"
    if isinstance(src, Image.Image):
        return _from_pil(src, what)
    if isinstance(src, torch.Tensor):
        t = src.detach().cpu()
        if t.dim() == 4 and t.shape[1] == 3 and t.shape[-1] != 3 and t.is_floating_point():
            return _prepared(t, what)
        src = t.float().numpy() if t.is_floating_point() else t.numpy()
    if isinstance(src, np.ndarray):
        return _from_array(src, what)
    raise ConditioningError(f"cannot read an image from a {type(src).__name__}; pass a file path, a PIL image, "
                            "an (H, W, 3) array or a ComfyUI IMAGE (1, H, W, 3)")


def _prepared(t: torch.Tensor, what: str) -> torch.Tensor:
    """A (1, 3, H, W) tensor in [-1, 1] — what :func:`load_image` returns — passes through."""
    if t.shape[0] != 1:
        raise ConditioningError(f"{what} is a batch of {t.shape[0]} pictures {tuple(t.shape)}; edit one at a time")
    t = t.float()
    if not torch.isfinite(t).all() or t.abs().max() > 1.0 + 1e-4:
        raise ConditioningError(f"a channels-first image tensor (1, 3, H, W) must hold values in [-1, 1]; got "
                                f"{t.min():.3g}..{t.max():.3g}. ComfyUI IMAGEs are (1, H, W, 3) in [0, 1]")
    return t.clone()


def _from_pil(img: Image.Image, what: str) -> torch.Tensor:
    mode = img.mode
    if mode == "RGBA":
        alpha = np.asarray(img)[..., 3]
        if (alpha < 255).any():
            raise ConditioningError(f"{what} has transparent pixels (RGBA with alpha < 255); the models edit opaque "
                                    f"RGB photos: flatten it onto a background, or {RGB_HELP}")
        img = img.convert("RGB")
    elif mode != "RGB":
        hint = {"L": "a grey picture", "LA": "a grey picture with alpha", "P": "a palette (indexed) picture — is it a "
                "mask given as the image?", "1": "a 1-bit picture", "CMYK": "a CMYK picture", "I": "a 32-bit integer "
                "picture", "I;16": "a 16-bit picture", "F": "a float picture", "YCbCr": "a YCbCr picture"}.get(mode, "")
        raise ConditioningError(f"{what} is not RGB (mode {mode!r}{': ' + hint if hint else ''}); {RGB_HELP}")
    return _to_tensor(np.asarray(img, dtype=np.uint8))


def _from_array(arr: np.ndarray, what: str) -> torch.Tensor:
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ConditioningError(f"{what} is a batch of {arr.shape[0]} pictures {tuple(arr.shape)}; edit one at a time")
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[-1] != 3:
        hint = " (channels first? move the colour axis last)" if arr.ndim == 3 and arr.shape[0] == 3 else ""
        raise ConditioningError(f"{what} must be RGB, an array (H, W, 3) or a ComfyUI IMAGE (1, H, W, 3); got shape "
                                f"{tuple(arr.shape)}{hint}. {RGB_HELP[0].upper() + RGB_HELP[1:]}")
    if arr.dtype == np.uint8:
        return _to_tensor(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ConditioningError(f"{what} holds NaN or infinite values")
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ConditioningError(f"float {what} must lie in [0, 1] (ComfyUI IMAGE convention); got "
                                    f"{arr.min():.3g}..{arr.max():.3g}. Pass uint8 0..255 or scale it to [0, 1]")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None] * 2.0 - 1.0
    raise ConditioningError(f"{what} has dtype {arr.dtype}; pass uint8 (0..255) or float (0..1) RGB")


def _to_tensor(rgb_u8: np.ndarray) -> torch.Tensor:
    # ToTensor (x / 255) then 2x - 1, as the reference's load_img.
    x = torch.from_numpy(np.array(rgb_u8, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)
    return (2.0 * x - 1.0)[None]


def check_image_size(image: torch.Tensor, pipe) -> None:
    """The picture must map onto whole latent pixels; a size other than the model's native one is allowed (the
    networks are convolutional) but the official models were trained at their native size."""
    f = vae_downscale(pipe)
    h, w = image.shape[-2:]
    if h % f or w % f:
        raise ConditioningError(f"the image is {w}×{h} pixels, not a multiple of the VAE's downscale factor {f}; "
                                f"crop or resize it to a multiple of {f} (the model's native size is "
                                f"{native_image_size(pipe)}×{native_image_size(pipe)})")


def check_sizes(image: Optional[torch.Tensor], masks: Mapping[str, Optional[np.ndarray]]) -> None:
    """Every mask must have the picture's size (the reference reads both at 256×256, no resize)."""
    sizes = {}
    if image is not None:
        sizes["image"] = tuple(int(v) for v in image.shape[-2:])
    for name, m in masks.items():
        if m is not None:
            sizes[name] = tuple(int(v) for v in np.asarray(m).shape[:2])
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k} {w}×{h}" for k, (h, w) in sizes.items())
        raise ConditioningError(
            f"the image and masks must have the same size; got {listed}. Resize the masks to the image's size with "
            "nearest-neighbour sampling (PIL: mask.resize(size, Image.NEAREST)) so that labels stay labels"
        )


def load_labels(src: Any, what: str, tolerance: Optional[float] = None) -> np.ndarray:
    """:func:`collab_core.masks.load_mask` with the mask's role in the message."""
    try:
        return load_mask(src, tolerance=tolerance)
    except ConditioningError as err:
        raise ConditioningError(f"{what}: {err}") from None


# ------------------------------------------------------------------------------------------------ the latent


@torch.no_grad()
def encode_image(pipe, image: torch.Tensor, *, sample: bool = True, seed: Optional[int] = 0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Picture (1, 3, H, W) in [-1, 1] → latent z₀ = scale_factor · (posterior sample or mean).

    The reference draws the posterior sample with ``torch.randn`` on the CPU right after ``manual_seed(seed)``;
    a CPU generator seeded with ``seed`` gives the same draw. ``sample=False`` takes the posterior mean
    (deterministic; what the inversion edit uses by default).
    """
    if pipe.vae is None:
        raise ConfigError("editing a picture needs the VAE: give a *_vae file, or a uni-modal/collaborative file that "
                          "holds one")
    check_image_size(image, pipe)
    vae_dtype = next(pipe.vae.parameters()).dtype
    dist = pipe.vae.encode(image.to(device=pipe.device, dtype=vae_dtype)).latent_dist
    z = dist.mean
    if sample:
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(int(seed if seed is not None else 0))
        noise = torch.randn(z.shape, generator=generator, dtype=torch.float32, device=generator.device)
        z = z + dist.std * noise.to(device=z.device, dtype=z.dtype)
    return (pipe.scale_factor * z).to(dtype=pipe.sample_dtype)  # float32 latent whatever the networks' dtype


# ------------------------------------------------------------------------------------------------ the region


def changed_labels(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Boolean (H, W): where the target mask's class differs from the source mask's."""
    check_sizes(None, {"source mask": source, "target mask": target})
    return np.asarray(source) != np.asarray(target)


def load_region(src: Any) -> np.ndarray:
    """A user-drawn edit region → bool (H, W): a picture (white = edit; grey level > 127) or a 2-D array/tensor
    (> 0.5 = edit; a ComfyUI MASK (1, H, W) too)."""
    if isinstance(src, (str, os.PathLike)):
        try:
            with Image.open(src) as img:
                src = img.convert("L")
        except FileNotFoundError:
            raise ConditioningError(f"edit region file not found: {os.fspath(src)}") from None
        except (UnidentifiedImageError, OSError) as err:
            raise ConditioningError(f"cannot read edit region {os.fspath(src)}: {err}") from None
    if isinstance(src, Image.Image):
        return np.asarray(src.convert("L")) > 127
    if isinstance(src, torch.Tensor):
        src = src.detach().float().cpu().numpy()
    arr = np.asarray(src)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ConditioningError(f"an edit region must be a 2-D map (H, W) with 1 = edit; got shape {arr.shape}")
    return arr.astype(np.float32) > 0.5


def edit_region(changed: np.ndarray | torch.Tensor, latent_hw: tuple[int, int], *, grow: int = 1,
                feather: float = 0.0) -> torch.Tensor:
    """A pixel map of what may change (True/1 = edit) → latent weights (1, 1, h, w) in [0, 1].

    A latent pixel is editable when any of the picture pixels it covers is (max-pooling); ``grow`` dilates the
    region by that many latent pixels (the VAE's receptive field reaches past a latent pixel, so a margin avoids
    seams); ``feather`` (latent pixels, Gaussian σ) adds a soft falloff outside the border (inside stays 1).
    """
    if grow < 0 or feather < 0:
        raise ConfigError(f"grow and feather must be >= 0, got grow={grow}, feather={feather}")
    m = torch.as_tensor(np.asarray(changed, dtype=np.float32) if not isinstance(changed, torch.Tensor)
                        else changed.float())
    if m.dim() != 2:
        raise ConditioningError(f"an edit region must be a 2-D map (H, W); got shape {tuple(m.shape)}")
    h, w = latent_hw
    H, W = m.shape
    if H % h or W % w:
        m = F.interpolate(m[None, None], size=(h * max(1, H // h), w * max(1, W // w)), mode="nearest")[0, 0]
        H, W = m.shape
    region = F.max_pool2d(m[None, None], kernel_size=(H // h, W // w))
    if grow:
        region = F.max_pool2d(region, kernel_size=2 * grow + 1, stride=1, padding=grow)
    if feather > 0:
        radius = max(1, int(round(3 * feather)))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / feather) ** 2)
        k = k / k.sum()
        blurred = F.conv2d(F.pad(region, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
        region = torch.maximum(region, blurred.clamp(0, 1))  # soft falloff outside, full weight inside
    return region


def region_to_pixels(region: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Latent weights (1, 1, h, w) → a float (H, W) map at picture resolution (nearest), for metrics and previews."""
    return F.interpolate(region.float().cpu(), size=size, mode="nearest")[0, 0].numpy()
