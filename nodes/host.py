"""Host objects built from the official checkpoints: a real MODEL, a real VAE, dynamic diffusers.

The networks are ComfyUI's own (``UNetModel``, ``AutoencoderKL``) configured from the checkpoint's shapes
(plus the official YAML for what shapes cannot tell: attention heads, scale factor, schedule), so every stock
node that takes a MODEL or VAE works with them. Reading files and splitting them into networks is
``collab_core``'s job; this module only turns those state dicts into host objects.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base
import comfy.utils
import folder_paths

from ..collab_core.checkpoint import read_checkpoint_metadata
from ..collab_core.layout import CheckpointParts
from ..collab_core.models import WHERE_TO_GET, build_encoder, demo_bundle_dir, demo_defaults
from ..collab_core.precision import cpu_has_native_bf16
from ..collab_core.schedule import LINEAR_END, LINEAR_START, NUM_TIMESTEPS
from ..collab_core.settings import (CONFIG_SUFFIXES, noise_schedule, resolve_config, resolve_scale_factor,
                                    split_file_lists)
from ..collab_core.vae import infer_vae_config, vae_ddconfig
from ..collab_core.yaml_config import OfficialConfig
from .attention import use_tiny_head_attention
from .errors import CollabNodeError

log = logging.getLogger("collaborative_diffusion")

#: Folder under the host's models directory that the loaders list (checkpoints/ is listed too).
MODEL_FOLDER = "collaborative_diffusion"
#: A rough linear map from the 3-channel CD latent to RGB, only for live previews (Latent2RGB).
LATENT_RGB_FACTORS = [[0.45, 0.10, 0.05], [0.10, 0.45, 0.10], [0.05, 0.10, 0.45]]
#: The combo value meaning "from the file / config".
AUTO = "auto"


# ------------------------------------------------------------------------------------------------- folders


def register_folders() -> None:
    """Add ``models/collaborative_diffusion`` (checkpoints and official YAMLs) without overwriting user paths,
    and, after it, the pack's own demo bundle, so that the demo models are listed on a fresh install."""
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    exts = set(folder_paths.supported_pt_extensions) | set(CONFIG_SUFFIXES)
    entry = folder_paths.folder_names_and_paths.get(MODEL_FOLDER)
    paths = list(entry[0]) if entry else []
    demo = demo_bundle_dir()
    for p in (default, str(demo) if demo else None):
        if p and p not in paths:
            paths.append(p)
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, exts)


def checkpoint_names() -> list[str]:
    """Checkpoint files in collaborative_diffusion/ and checkpoints/ (both listed, de-duplicated)."""
    names = list(folder_paths.get_filename_list(MODEL_FOLDER))
    try:
        names += folder_paths.get_filename_list("checkpoints")
    except Exception:  # pragma: no cover - a host without the folder
        pass
    return split_file_lists(names)[0]


def config_names() -> list[str]:
    return [AUTO] + split_file_lists(folder_paths.get_filename_list(MODEL_FOLDER))[1]


def checkpoint_path(name: str, node: str) -> Path:
    for folder in (MODEL_FOLDER, "checkpoints"):
        try:
            p = folder_paths.get_full_path(folder, name)
        except Exception:
            p = None
        if p and os.path.isfile(p):
            return Path(p)
    where = ", ".join(folder_paths.get_folder_paths(MODEL_FOLDER) + folder_paths.get_folder_paths("checkpoints"))
    raise CollabNodeError(node, f"checkpoint '{name}' not found in {where}. Put the file there and refresh "
                                f"(R in the browser). {WHERE_TO_GET}")


def missing_checkpoint_message(name: str) -> Optional[str]:
    """For VALIDATE_INPUTS: None when the file exists, else what to do."""
    if name in checkpoint_names():
        return None
    where = ", ".join(folder_paths.get_folder_paths(MODEL_FOLDER) + folder_paths.get_folder_paths("checkpoints"))
    return (f"checkpoint '{name}' not found; put it in one of: {where} (then press R in the browser to refresh "
            f"the list). {WHERE_TO_GET}")


#: Face masks that ship with the pack, offered by Load Face Mask next to the input folder's pictures, so the
#: example workflows run without copying files first. Shown under a prefix no input file name can clash with.
BUNDLED_MASK_PREFIX = "[pack] "
_EXAMPLES = Path(__file__).resolve().parent.parent / "workflows"


def bundled_masks() -> dict[str, Path]:
    found = {}
    demo_mask = demo_defaults().get("mask")
    if demo_mask is not None and Path(demo_mask).is_file():
        found[BUNDLED_MASK_PREFIX + "demo_default_mask.png"] = Path(demo_mask)
    for name in ("face_mask_example.png", "edit_example_target_mask.png"):
        if (_EXAMPLES / name).is_file():
            found[BUNDLED_MASK_PREFIX + name] = _EXAMPLES / name
    return found


def read_config(config: str, ckpt: Path, node: str) -> OfficialConfig:
    """The checkpoint's settings as the core resolves them (:func:`collab_core.settings.resolve_config`): the
    YAML chosen in the node (else, 'auto', the one beside the checkpoint), then the file's metadata."""
    chosen = []
    if config and config != AUTO:
        p = folder_paths.get_full_path(MODEL_FOLDER, config)
        if not p:
            raise CollabNodeError(node, f"config '{config}' not found in models/{MODEL_FOLDER}; choose 'auto'")
        chosen = [Path(p)]
    # a chosen YAML replaces the one beside the checkpoint rather than being filled in by it
    return resolve_config([] if chosen else [ckpt], chosen, [read_checkpoint_metadata(ckpt)])


# ------------------------------------------------------------------------------------------------- MODEL


class CollabLatentFormat(comfy.latent_formats.LatentFormat):
    """The 3-channel latent of the official KL-VAE; scale 0.141 (512 set) or 0.058 (256 set)."""

    latent_channels = 3
    latent_rgb_factors = LATENT_RGB_FACTORS
    latent_rgb_factors_bias = [0.0, 0.0, 0.0]

    def __init__(self, scale_factor: float = 0.141, channels: int = 3):
        self.scale_factor = float(scale_factor)
        self.latent_channels = int(channels)
        if channels != 3:
            self.latent_rgb_factors = None


class CollabModelConfig(comfy.supported_models_base.BASE):
    """Host model config for the uni-modal UNets and the dynamic diffusers (never auto-detected)."""

    unet_config: dict = {}
    unet_extra_config: dict = {}  # heads come from the checkpoint's YAML, not the SD default of 64 per head
    latent_format = CollabLatentFormat
    sampling_settings = {"beta_schedule": "linear", "linear_start": LINEAR_START, "linear_end": LINEAR_END,
                         "timesteps": NUM_TIMESTEPS}
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    memory_usage_factor = 2.0

    def __init__(self, unet_config: dict, scale_factor: float = 0.141, schedule: Optional[dict] = None):
        super().__init__(unet_config)
        self.sampling_settings = dict(self.sampling_settings, **(schedule or {}))
        self.latent_format = CollabLatentFormat(scale_factor, unet_config.get("in_channels", 3))

    def inpaint_model(self):  # 3 latent channels: never an inpainting model
        return False


@dataclass
class ModelInfo:
    """What the pack knows about a MODEL it built (kept on the BaseModel, shared by clones)."""

    modality: str
    source: str
    heads: int
    heads_from: str
    context_dim: int
    latent_channels: int
    model_channels: int
    channel_mult: tuple
    scale_factor: float
    role: str = "unet"  # "unet" | "diffuser"
    extra: dict = field(default_factory=dict)


def model_info(model) -> Optional[ModelInfo]:
    """The pack's info for a MODEL (ModelPatcher) or BaseModel, None for other models."""
    base = getattr(model, "model", model)
    return getattr(base, "collab_info", None)


def schedule_settings(cfg: OfficialConfig, parts: CheckpointParts, node: str) -> dict:
    """The host's ``sampling_settings``: the host samples with the linear schedule these name, so a file whose
    stored schedule is another one is refused rather than sampled off its training."""
    schedule = noise_schedule(cfg, parts.schedule)
    if not schedule.stored_matches:
        raise CollabNodeError(
            node,
            f"the checkpoint's stored noise schedule is not the linear {schedule.linear_start}-{schedule.linear_end} "
            f"schedule over {schedule.timesteps} steps that the node would use; choose the model's official YAML in "
            f"'config' (put it in models/{MODEL_FOLDER}/)")
    return schedule.linear_settings()


def scale_factor_for(cfg: OfficialConfig, parts: CheckpointParts, vae_sd: Optional[dict] = None) -> float:
    """The latent scale factor of a MODEL (:func:`collab_core.settings.resolve_scale_factor`)."""
    return resolve_scale_factor(cfg, vae_sd if vae_sd is not None else parts.vae)


def build_model(unet_sd: dict, *, modality: str, source: str, heads: int, heads_from: str,
                head_channels: Optional[int], scale_factor: float, schedule: dict, role: str = "unet",
                node: str = "") -> comfy.model_patcher.ModelPatcher:
    """An official LDM UNet (or dynamic diffuser) state dict → a host MODEL (ModelPatcher over a BaseModel)."""
    unet_config = comfy.model_detection.detect_unet_config(unet_sd, "")
    if unet_config is None:
        raise CollabNodeError(node, f"{source}: the {modality} {role} is not an LDM UNet the host understands")
    if head_channels:
        unet_config.update(num_heads=-1, num_head_channels=int(head_channels))
    else:
        widths = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
        bad = [w for w in widths if w % heads]
        if bad:
            raise CollabNodeError(node, f"{source}: {heads} attention heads ({heads_from}) do not divide the "
                                        f"{modality} {role}'s widths {bad}; choose the model's official YAML in "
                                        "'config' or set 'heads'")
        unet_config.update(num_heads=int(heads), num_head_channels=-1)
    cfg = CollabModelConfig(unet_config, scale_factor, schedule)
    load_device = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    params = comfy.utils.calculate_parameters(unet_sd)
    dtype = comfy.model_management.unet_dtype(model_params=params, supported_dtypes=cfg.supported_inference_dtypes,
                                              weight_dtype=comfy.utils.weight_dtype(unet_sd))
    manual_cast = compute_dtype(dtype, load_device, cfg.supported_inference_dtypes)
    cfg.set_inference_dtype(dtype, manual_cast)
    base = comfy.model_base.BaseModel(cfg, comfy.model_base.ModelType.EPS, device=offload)
    missing, unexpected = base.diffusion_model.load_state_dict(unet_sd, strict=False)
    if missing or unexpected:
        raise CollabNodeError(
            node, f"{source}: the {modality} {role} weights do not fit the host UNet built from their shapes "
                  f"(missing {missing[:4]}, unexpected {unexpected[:4]}); is the file complete?")
    base.collab_info = ModelInfo(
        modality=modality, source=source, heads=int(heads), heads_from=heads_from,
        context_dim=int(unet_config.get("context_dim") or 0), latent_channels=int(unet_config["in_channels"]),
        model_channels=int(unet_config["model_channels"]), channel_mult=tuple(unet_config["channel_mult"]),
        scale_factor=float(scale_factor), role=role)
    patcher = host_patcher_class()(base, load_device=load_device, offload_device=offload)
    use_tiny_head_attention(patcher, load_device)
    return patcher


def compute_dtype(weight_dtype: torch.dtype, load_device, supported: list) -> Optional[torch.dtype]:
    """The dtype the networks compute in (None: their weights' own), as the host's ``unet_manual_cast`` decides,
    except bfloat16 weights on a CPU with native bfloat16 dot products (AVX512-BF16, AMX, Arm BF16): the host casts
    them to float32 on every CPU, because bfloat16 is emulated and slow on most; on these it is about twice as fast
    as float32, so they compute in bfloat16 (``--bf16-unet`` on such a CPU then means what it says)."""
    cast = comfy.model_management.unet_manual_cast(weight_dtype, load_device, supported)
    if (weight_dtype == torch.bfloat16 and cast is not None and torch.device(load_device).type == "cpu"
            and cpu_has_native_bf16()):
        return None
    return cast


def host_patcher_class():
    """The patcher class the host builds its own models with: ``CoreModelPatcher`` where it exists (``main.py``
    points it at ``ModelPatcherDynamic`` when dynamic VRAM is on, since 0.29), else ``ModelPatcher``. Looked up
    at each load, because the host may switch it after the pack was imported."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


# ------------------------------------------------------------------------------------------------- VAE


def build_vae(vae_sd: dict, cfg: Optional[OfficialConfig] = None) -> comfy.sd.VAE:
    """An LDM KL-VAE state dict → a host VAE (ComfyUI's AutoencoderKL), sized from the weights' shapes."""
    vc = infer_vae_config(vae_sd)
    dd = vae_ddconfig(vc.block_out_channels, vc.layers_per_block, vc.latent_channels, vc.in_channels,
                      vc.out_channels, vc.mid_block_add_attention)
    vae = comfy.sd.VAE(sd=dict(vae_sd), config={"params": {"ddconfig": dd, "embed_dim": vc.latent_channels}})
    factor = vc.downscale
    vae.latent_channels = vc.latent_channels
    vae.downscale_ratio = factor
    vae.upscale_ratio = factor
    return vae


# ------------------------------------------------------------------------------------------------- encoders


@dataclass
class CollabEncoder:
    """A uni-modal model's condition encoder (collab_core TextEncoder or MaskEncoder) as a host object."""

    modality: str
    kind: str  # "text" | "mask"
    module: torch.nn.Module
    source: str

    @property
    def dim(self) -> int:
        return int(self.module.dim)


def encoder_for(parts: CheckpointParts, modality: str, source: str) -> CollabEncoder:
    """The condition encoder of ``modality`` as a host object (:func:`collab_core.models.build_encoder`)."""
    module, kind = build_encoder(parts, modality, source)
    return CollabEncoder(modality=modality, kind=kind, module=module, source=source)


# ------------------------------------------------------------------------------------------------- diffusers


@dataclass
class DynamicDiffuser:
    """The dynamic diffusers of a collaborative checkpoint: one host-managed network per modality, in order."""

    modalities: list
    patchers: dict  # modality -> ModelPatcher (BaseModel with a 1-channel UNet)
    source: str

    def describe(self) -> str:
        return f"{self.source}: " + ", ".join(self.modalities)
