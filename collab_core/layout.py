"""Split an official (LDM-layout) state dict into its networks by key prefix.

The official files nest the same networks under different prefixes (uni-modal
``model.diffusion_model.*``, collaborative ``model.text_unet.diffusion_model.*``, ...). Everything
downstream works on per-network dicts with the prefix removed, so this is the one place that knows
the prefixes. Modality names are parsed generically from the collaborative prefixes so that our
own collaborative checkpoints with other modalities split the same way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import save_safetensors
from .errors import CheckpointError

__all__ = [
    "CheckpointParts",
    "PART_KINDS",
    "PARTS_FORMAT_VERSION",
    "SHARED_PART_FILES",
    "normalize_modality",
    "order_modalities",
    "split_checkpoint",
    "write_parts",
]

PARTS_FORMAT_VERSION = "1"
PART_KINDS = ("unet", "diffuser", "vae", "text_encoder", "mask_encoder", "schedule", "unrecognised")
# Parts that belong to no modality.
_SHARED_PARTS = ("vae", "schedule", "unrecognised")
#: File names of the parts that belong to no modality (the others are ``<modality>_<kind>.safetensors``).
SHARED_PART_FILES = {"vae": "vae.safetensors", "schedule": "noise_schedule.safetensors",
                     "unrecognised": "unrecognised_tensors.safetensors"}

# The reference's name for the mask modality; everything else keeps its name.
_MODALITY_ALIASES = {"seg_mask": "mask"}
# The reference's softmax channel order puts mask before text.
_PREFERRED_ORDER = ("mask", "text")

_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")
_TEXT_ROOTS = ("token_emb.", "pos_emb.", "attn_layers.", "norm.", "to_logits.", "project_emb.")
_SCHEDULE_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "lvlb_weights",
        "logvar",
    }
)
# Keys we knowingly drop: the VAE's training loss (LPIPS, discriminator) and EMA copies.
_DROPPED_PREFIXES = ("loss.", "first_stage_model.loss.", "model_ema.")

_RE_COLLAB_NET = re.compile(r"^model\.(?P<name>.+?)_(?P<role>unet|confidence_predictor)\.diffusion_model\.(?P<rest>.+)$")
_RE_COLLAB_ENC = re.compile(r"^cond_stage_model\.(?P<name>.+?)_cond_stage_model\.(?P<rest>.+)$")

_EXPECTED_PREFIXES_HELP = (
    "expected official Collaborative Diffusion / LDM prefixes: "
    "'model.diffusion_model.', 'first_stage_model.', 'cond_stage_model.transformer.' or "
    "'cond_stage_model.linear.' (uni-modal), 'model.<modality>_unet.diffusion_model.', "
    "'model.<modality>_confidence_predictor.diffusion_model.', "
    "'cond_stage_model.<modality>_cond_stage_model.' (collaborative), root 'encoder.'/'decoder.' "
    "(VAE), or a part file written by `python -m collab_core convert`"
)


def normalize_modality(name: str) -> str:
    """Official ``seg_mask`` -> ``mask``; other names unchanged (stripped, lower-case)."""
    n = name.strip().lower()
    return _MODALITY_ALIASES.get(n, n)


def order_modalities(names, metadata_order: str | None = None) -> list[str]:
    """Fusion order: metadata order if given, else ``mask``, ``text``, then the rest sorted.

    The order is the softmax channel order of the dynamic diffusers, so it must be stable.
    """
    names = {normalize_modality(n) for n in names}
    ordered: list[str] = []
    if metadata_order:
        for n in metadata_order.split(","):
            n = normalize_modality(n)
            if n and n in names and n not in ordered:
                ordered.append(n)
    for n in _PREFERRED_ORDER:
        if n in names and n not in ordered:
            ordered.append(n)
    ordered.extend(sorted(names - set(ordered)))
    return ordered


@dataclass
class CheckpointParts:
    """The networks found in one file, each as an LDM-layout dict with its prefix removed."""

    kind: str  # "unimodal" | "collaborative" | "vae" | "part"
    unets: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    diffusers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    vae: dict[str, torch.Tensor] | None = None
    text_encoders: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    mask_encoders: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    schedule: dict[str, torch.Tensor] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line per network, for logs and the convert command."""

        def n_params(sd: Mapping[str, torch.Tensor]) -> str:
            return f"{sum(t.numel() for t in sd.values()) / 1e6:.1f}M params"

        lines = [f"{self.kind} checkpoint; modalities: {', '.join(self.modalities) or '-'}"]
        for m, sd in self.unets.items():
            lines.append(f"  UNet [{m}]: {len(sd)} tensors, {n_params(sd)}")
        for m, sd in self.diffusers.items():
            lines.append(f"  dynamic diffuser [{m}]: {len(sd)} tensors, {n_params(sd)}")
        for m, sd in self.text_encoders.items():
            lines.append(f"  text encoder [{m}]: {len(sd)} tensors, {n_params(sd)}")
        for m, sd in self.mask_encoders.items():
            lines.append(f"  mask encoder [{m}]: {len(sd)} tensors, {n_params(sd)}")
        if self.vae is not None:
            lines.append(f"  VAE: {len(self.vae)} tensors, {n_params(self.vae)}")
        if self.schedule:
            lines.append(f"  schedule buffers: {', '.join(sorted(self.schedule))}")
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} tensors (e.g. {self.ignored[0]})")
        return "\n".join(lines)


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def _unrecognised(keys, why: str) -> CheckpointError:
    sample = ", ".join(list(keys)[:6])
    return CheckpointError(f"{why} (sample keys: {sample}); {_EXPECTED_PREFIXES_HELP}.")


def _encoder_kind(sub: Mapping[str, torch.Tensor]) -> str | None:
    if sub and all(k.startswith("transformer.") for k in sub):
        return "text"
    if sub and all(k.startswith("linear.") for k in sub):
        return "mask"
    return None


def _split_part(sd: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> CheckpointParts:
    part = metadata.get("collab_part", "")
    if part not in PART_KINDS:
        raise CheckpointError(
            f"part file declares collab_part={part!r}; expected one of {', '.join(PART_KINDS)}"
        )
    modality = normalize_modality(metadata.get("modality", "")) if metadata.get("modality") else ""
    if part not in _SHARED_PARTS and not modality:
        raise CheckpointError(f"part file of kind {part!r} has no 'modality' in its metadata")
    parts = CheckpointParts(kind="part")
    sd = dict(sd)
    if part == "schedule":
        parts.schedule = sd
    elif part == "unrecognised":  # kept by convert so that nothing of the source is lost; no network reads it
        parts.ignored = sorted(sd)
    elif part == "unet":
        parts.unets[modality] = sd
    elif part == "diffuser":
        parts.diffusers[modality] = sd
    elif part == "vae":
        parts.vae = sd
    elif part == "text_encoder":
        parts.text_encoders[modality] = sd
    else:
        parts.mask_encoders[modality] = sd
    parts.modalities = order_modalities([modality] if modality else [], metadata.get("modalities"))
    return parts


def _split_bare(sd: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> CheckpointParts | None:
    """A single network saved without prefix (e.g. by another tool); None if it is not one."""
    keys = list(sd)
    modality = normalize_modality(metadata["modality"]) if metadata.get("modality") else ""
    if all(k.startswith(_VAE_ROOTS) or k.startswith("loss.") for k in keys) and any(
        k.startswith(("encoder.", "decoder.")) for k in keys
    ):
        return CheckpointParts(kind="vae", vae=_drop_loss(sd))
    if all(k.startswith(_UNET_ROOTS) for k in keys) and "input_blocks.0.0.weight" in sd:
        out = sd.get("out.2.weight")
        role = "diffuser" if out is not None and out.shape[0] == 1 else "unet"
        if not modality:
            raise CheckpointError(
                f"this file holds a single {'dynamic diffuser' if role == 'diffuser' else 'UNet'} "
                "without saying which modality it belongs to; convert the full official checkpoint "
                "with `python -m collab_core convert` instead"
            )
        return _split_part(sd, {**metadata, "collab_part": role, "modality": modality})
    if all(k.startswith(_TEXT_ROOTS) for k in keys) and "token_emb.weight" in sd:
        return _split_part(sd, {**metadata, "collab_part": "text_encoder", "modality": modality or "text"})
    if set(keys) <= {"linear.weight", "linear.bias"} and "linear.weight" in sd:
        return _split_part(sd, {**metadata, "collab_part": "mask_encoder", "modality": modality or "mask"})
    return None


def _drop_loss(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}


def split_checkpoint(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> CheckpointParts:
    """Sort the tensors of one file into networks; see :class:`CheckpointParts`.

    ``metadata`` (safetensors header) may carry ``collab_part``/``modality`` for part files and
    ``modalities`` (comma-separated) to fix the fusion order of a collaborative file. Every network weight is
    checked (:func:`check_weights`): a file that would sample to black is refused here, at load.
    """
    parts = _split_checkpoint(state_dict, metadata)
    check_weights(parts)
    return parts


def check_weights(parts: CheckpointParts) -> None:
    """Refuse networks with integer (or bool) weights or with NaN/inf values, naming the tensors."""
    nets = [(f"UNet [{m}]", sd) for m, sd in parts.unets.items()]
    nets += [(f"dynamic diffuser [{m}]", sd) for m, sd in parts.diffusers.items()]
    nets += [(f"text encoder [{m}]", sd) for m, sd in parts.text_encoders.items()]
    nets += [(f"mask encoder [{m}]", sd) for m, sd in parts.mask_encoders.items()]
    if parts.vae is not None:
        nets.append(("VAE", parts.vae))
    not_float, not_finite = [], []
    for where, sd in nets:
        for k, v in sd.items():
            if not v.is_floating_point():
                not_float.append(f"{where} {k} ({str(v.dtype).replace('torch.', '')})")
            elif v.numel() and v.device.type != "meta" and not bool(torch.isfinite(v).all()):  # meta: no values
                not_finite.append(f"{where} {k}")
    if not_float:
        raise CheckpointError(
            f"{len(not_float)} network weight(s) are not floating-point numbers, e.g. {', '.join(not_float[:4])}: "
            "the file was written by a tool that converted the weights to integers; use the original file")
    if not_finite:
        raise CheckpointError(
            f"{len(not_finite)} network weight(s) hold NaN or infinite values, e.g. {', '.join(not_finite[:4])}: "
            "sampling with them gives a black or noise picture. The file is damaged or comes from a diverged "
            "training run; download it again or use an earlier checkpoint")


class _Taker:
    """Takes tensors out of a state dict by prefix, remembering which keys were used."""

    def __init__(self, sd: Mapping[str, torch.Tensor]):
        self.sd = sd
        self.used: set[str] = set()

    def prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        sub = {k: v for k, v in self.sd.items() if k.startswith(prefix)}
        self.used.update(sub)
        return {k[len(prefix):]: v for k, v in sub.items()}


def _split_collaborative(take: _Taker, parts: CheckpointParts) -> None:
    """Per modality ``model.<m>_unet.*`` / ``model.<m>_confidence_predictor.*`` and ``<m>_cond_stage_model.*``."""
    nets: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in take.sd.items():
        m = _RE_COLLAB_NET.match(k)
        if m:
            nets.setdefault((m["role"], normalize_modality(m["name"])), {})[m["rest"]] = v
            take.used.add(k)
    for (role, name), net in nets.items():
        (parts.unets if role == "unet" else parts.diffusers)[name] = net
    encs: dict[str, dict[str, torch.Tensor]] = {}
    enc_keys: dict[str, list[str]] = {}
    for k, v in take.sd.items():
        m = _RE_COLLAB_ENC.match(k)
        if m:
            name = normalize_modality(m["name"])
            encs.setdefault(name, {})[m["rest"]] = v
            enc_keys.setdefault(name, []).append(k)
    for name, sub in encs.items():
        kind = _encoder_kind(sub)
        if kind is None:
            continue  # stays in `ignored`: an encoder type this pack does not know
        take.used.update(enc_keys[name])
        if kind == "text":
            parts.text_encoders[name] = _strip(sub, "transformer.")
        else:
            parts.mask_encoders[name] = dict(sub)


def _split_unimodal(take: _Taker, metadata: Mapping[str, str], parts: CheckpointParts) -> None:
    """``model.diffusion_model.*`` plus one encoder, whose kind names the modality."""
    unet = take.prefix("model.diffusion_model.")
    text = take.prefix("cond_stage_model.transformer.")
    mask = take.prefix("cond_stage_model.linear.")
    if text and mask:
        raise _unrecognised(
            ["cond_stage_model.transformer.*", "cond_stage_model.linear.*"],
            "a uni-modal file with both a text and a mask encoder",
        )
    if text:
        modality = "text"
        parts.text_encoders["text"] = text
    elif mask:
        modality = "mask"
        parts.mask_encoders["mask"] = {"linear." + k: v for k, v in mask.items()}
    elif metadata.get("modality"):
        modality = normalize_modality(metadata["modality"])
    else:
        raise CheckpointError(
            "uni-modal checkpoint without a condition encoder ('cond_stage_model.transformer.*' "
            "for text, 'cond_stage_model.linear.*' for mask), so its modality is unknown; "
            "use the official text/mask checkpoint"
        )
    parts.unets[modality] = unet


def _split_checkpoint(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> CheckpointParts:
    metadata = dict(metadata or {})
    sd = dict(state_dict)
    if not sd:
        raise CheckpointError("the checkpoint holds no tensors")
    if metadata.get("collab_part"):
        return _split_part(sd, metadata)
    has_collab = any(_RE_COLLAB_NET.match(k) for k in sd)
    has_unimodal = any(k.startswith("model.diffusion_model.") for k in sd)
    if has_collab and has_unimodal:
        raise _unrecognised([k for k in sd if k.startswith("model.")],
                            "the file mixes uni-modal and collaborative network prefixes")
    if not (has_collab or has_unimodal):
        bare = _split_bare(sd, metadata)
        if bare is not None:
            return bare
        raise _unrecognised(sd, "no known network prefix in this checkpoint")

    parts = CheckpointParts(kind="collaborative" if has_collab else "unimodal")
    take = _Taker(sd)
    vae = take.prefix("first_stage_model.")
    if vae:
        parts.vae = _drop_loss(vae)
    for k in sd:
        if k in _SCHEDULE_KEYS:
            parts.schedule[k] = sd[k]
            take.used.add(k)
    if has_collab:
        _split_collaborative(take, parts)
    else:
        _split_unimodal(take, metadata, parts)
    parts.ignored = sorted(k for k in sd if k not in take.used and not k.startswith(_DROPPED_PREFIXES))
    if not (parts.unets or parts.diffusers or parts.text_encoders or parts.mask_encoders):
        raise _unrecognised(sd, "no network found in this checkpoint")
    names = set(parts.unets) | set(parts.diffusers) | set(parts.text_encoders) | set(parts.mask_encoders)
    parts.modalities = order_modalities(names, metadata.get("modalities"))
    return parts


def write_parts(parts: CheckpointParts, out_dir: str | os.PathLike, source_name: str,
                unrecognised: Mapping[str, torch.Tensor] | None = None) -> list[Path]:
    """Write each network of ``parts`` as its own ``.safetensors`` with self-describing metadata, plus the noise
    schedule buffers and (``unrecognised``: the source's tensors named in ``parts.ignored``) what no network
    claims, so that a converted file keeps everything it held except the training-only loss/EMA tensors.

    The metadata (``collab_part``, ``modality``, ``modalities``, source, format version) lets
    :func:`split_checkpoint` read a part file back without guessing from key names.
    """
    out = Path(out_dir).expanduser()
    written: list[Path] = []
    common = {
        "source": str(source_name),
        "format_version": PARTS_FORMAT_VERSION,
        "modalities": ",".join(parts.modalities),
        "source_kind": parts.kind,
    }

    def write(tensors: Mapping[str, torch.Tensor], part: str, modality: str, filename: str) -> None:
        meta = {**common, "collab_part": part}
        if modality:
            meta["modality"] = modality
        written.append(save_safetensors(tensors, out / filename, meta))

    for m, sd in parts.unets.items():
        write(sd, "unet", m, f"{m}_unet.safetensors")
    for m, sd in parts.diffusers.items():
        write(sd, "diffuser", m, f"{m}_diffuser.safetensors")
    if parts.vae is not None:
        write(parts.vae, "vae", "", SHARED_PART_FILES["vae"])
    for m, sd in parts.text_encoders.items():
        write(sd, "text_encoder", m, f"{m}_text_encoder.safetensors")
    for m, sd in parts.mask_encoders.items():
        write(sd, "mask_encoder", m, f"{m}_mask_encoder.safetensors")
    if parts.schedule:
        write(parts.schedule, "schedule", "", SHARED_PART_FILES["schedule"])
    if unrecognised:
        write(unrecognised, "unrecognised", "", SHARED_PART_FILES["unrecognised"])
    return written
