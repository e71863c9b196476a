"""Loader nodes: uni-modal model (MODEL + its encoder + VAE), VAE, dynamic diffuser."""

from __future__ import annotations

from comfy_execution.graph_utils import ExecutionBlocker

from ..collab_core.models import read_parts
from ..collab_core.settings import attention_heads
from . import host
from .host import AUTO
from .errors import CollabNodeError
from .schema import CollabNode, Diffuser, Encoder, advanced, io

MODALITY_CHOICES = [AUTO, "text", "mask"]


def _heads_input(what: str):
    return advanced(io.Int.Input("heads", default=0, min=0, max=256,
                                 tooltip=f"Attention heads of the {what}. 0 = from the official YAML (config), else "
                                         "the official 32. Weights cannot tell the head count."))


def _config_input():
    return io.Combo.Input("config", options=host.config_names(),
                          tooltip="The model's official YAML (configs/*.yaml of the authors' repository). 'auto' = a "
                                  "YAML named like the checkpoint beside it or in ../configs; without one the official "
                                  "512/256 settings are used.")


def _checkpoint_input(name: str, tooltip: str):
    return io.Combo.Input(name, options=host.checkpoint_names(), tooltip=tooltip)


def _read_checkpoint(node, ckpt_name, config):
    """The file behind a loader's choice, split into parts, with its settings (:func:`host.read_config`)."""
    path = host.checkpoint_path(ckpt_name, node)
    return path, read_parts(path), host.read_config(config, path, node)


class CollabUnimodalLoader(CollabNode):
    """Load a uni-modal Collaborative Diffusion model (512_text.ckpt, 512_mask.ckpt, or one branch of the
    collaborative file) as a host MODEL, with its condition encoder and the VAE the file holds."""

    NODE_ID = "CollabUnimodalLoader"
    NAME = "Load Collaborative Model"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[_checkpoint_input("ckpt_name", "From models/collaborative_diffusion or models/checkpoints."),
                    io.Combo.Input("modality", options=MODALITY_CHOICES, default=AUTO,
                                   tooltip="Which uni-modal model of the file: 'auto' takes the only one (512_text / "
                                           "512_mask); the collaborative file holds both."),
                    _config_input(), _heads_input("UNet")],
            outputs=[io.Model.Output(display_name="model", tooltip="A host MODEL: works with KSampler, "
                                     "SamplerCustomAdvanced, FreeU, model merging …"),
                     Encoder.Output(display_name="encoder", tooltip="The model's condition encoder (text or mask) for "
                                    "Collaborative Text/Mask Encode."),
                     io.Vae.Output(display_name="vae", tooltip="The VAE stored in the file (blocked with a message if "
                                   "the file has none).")])

    @classmethod
    def validate_inputs(cls, ckpt_name):
        return host.missing_checkpoint_message(ckpt_name) or True

    @classmethod
    def run(cls, ckpt_name, modality=AUTO, config=AUTO, heads=0):
        node = cls.NAME
        path, parts, cfg = _read_checkpoint(node, ckpt_name, config)
        if not parts.unets:
            raise CollabNodeError(node, f"{path.name} holds no uni-modal UNet ({parts.describe().splitlines()[0]}); "
                                        "choose 512_text / 512_mask or the collaborative checkpoint. A dynamic "
                                        "diffuser file goes into Load Dynamic Diffuser, a *_vae file into Load "
                                        "Collaborative VAE")
        names = list(parts.unets)
        if modality == AUTO:
            if len(names) > 1:
                raise CollabNodeError(node, f"{path.name} holds the uni-modal models {names}; set 'modality' to one of them")
            modality = names[0]
        elif modality not in parts.unets:
            raise CollabNodeError(node, f"{path.name} holds no '{modality}' model, only {names}; set 'modality' to one "
                                        "of them or 'auto'")
        h = attention_heads(cfg, modality, "unet", override=heads, what="UNet")
        model = host.build_model(
            parts.unets[modality], modality=modality, source=path.name, heads=h.num_heads, heads_from=h.source,
            head_channels=h.head_channels, scale_factor=host.scale_factor_for(cfg, parts),
            schedule=host.schedule_settings(cfg, parts, node), node=node)
        encoder = host.encoder_for(parts, modality, path.name)
        info = host.model_info(model)
        if info.context_dim and encoder.dim != info.context_dim:
            raise CollabNodeError(node, f"{path.name}: the {modality} UNet attends to {info.context_dim}-dim tokens but "
                                        f"its encoder gives {encoder.dim}-dim tokens; the file is inconsistent")
        if parts.vae is not None:
            vae = host.build_vae(parts.vae, cfg)
        else:
            vae = ExecutionBlocker(f"[{node}] {path.name} holds no VAE; load 512_vae (or 256_vae) with "
                                   "Load Collaborative VAE and wire that VAE instead")
        return (model, encoder, vae)


class CollabVAELoader(CollabNode):
    """Load the official KL-VAE (512_vae.ckpt / 256_vae.ckpt, or the VAE inside any official file) as a host VAE."""

    NODE_ID = "CollabVAELoader"
    NAME = "Load Collaborative VAE"

    @classmethod
    def define_schema(cls):
        return cls.schema(inputs=[_checkpoint_input("vae_name", "A *_vae file, or any official checkpoint holding "
                                                                "first_stage_model.*")],
                          outputs=[io.Vae.Output(tooltip="A host VAE for VAE Encode / VAE Decode.")])

    @classmethod
    def validate_inputs(cls, vae_name):
        return host.missing_checkpoint_message(vae_name) or True

    @classmethod
    def run(cls, vae_name):
        node = cls.NAME
        path = host.checkpoint_path(vae_name, node)
        parts = read_parts(path)
        if parts.vae is None:
            raise CollabNodeError(node, f"{path.name} holds no VAE ({parts.describe().splitlines()[0]}); choose "
                                        "512_vae / 256_vae or an official uni-modal/collaborative checkpoint")
        return (host.build_vae(parts.vae),)


class CollabDiffuserLoader(CollabNode):
    """Load the dynamic diffusers of a collaborative checkpoint (512_codiff_mask_text.ckpt): one learned
    influence network per modality."""

    NODE_ID = "CollabDiffuserLoader"
    NAME = "Load Dynamic Diffuser"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[_checkpoint_input("ckpt_name", "The collaborative checkpoint (*_codiff_*)."), _config_input(),
                    _heads_input("dynamic diffusers")],
            outputs=[Diffuser.Output(display_name="dynamic_diffuser",
                                     tooltip="Wire into Collaborative Guider / KSampler."),
                     io.String.Output(display_name="modalities", tooltip="The modality names in fusion order.")])

    @classmethod
    def validate_inputs(cls, ckpt_name):
        return host.missing_checkpoint_message(ckpt_name) or True

    @classmethod
    def run(cls, ckpt_name, config=AUTO, heads=0):
        node = cls.NAME
        path, parts, cfg = _read_checkpoint(node, ckpt_name, config)
        if not parts.diffusers:
            raise CollabNodeError(node, f"{path.name} holds no dynamic diffusers ({parts.describe().splitlines()[0]}); "
                                        "choose the collaborative checkpoint (e.g. 512_codiff_mask_text.ckpt)")
        order = [m for m in parts.modalities if m in parts.diffusers]
        patchers = {}
        scale = host.scale_factor_for(cfg, parts)
        schedule = host.schedule_settings(cfg, parts, node)
        for m in order:
            h = attention_heads(cfg, m, "diffuser", override=heads, what="dynamic diffuser")
            patchers[m] = host.build_model(parts.diffusers[m], modality=m, source=path.name, heads=h.num_heads,
                                           heads_from=h.source, head_channels=h.head_channels,
                                           scale_factor=scale, schedule=schedule, role="dynamic diffuser",
                                           node=node)
        return (host.DynamicDiffuser(modalities=order, patchers=patchers, source=path.name), ", ".join(order))


NODES = [CollabUnimodalLoader, CollabVAELoader, CollabDiffuserLoader]
