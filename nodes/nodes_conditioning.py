"""Condition nodes: text and mask encoders → standard CONDITIONING, a face-mask loader and a colour preview."""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch

import folder_paths

from ..collab_core.masks import CLASS_NAMES, load_mask
from . import host
from .conditioning import make_conditioning
from .labels import labels_from_host, labels_to_host_mask, labels_to_preview
from .schema import CollabNode, CollabNodeError, Encoder, io

_TOLERANCE_TIP = ("For colour pictures: snap colours within this RGB distance to the nearest class colour (JPEG, "
                  "antialiasing). 0 = exact colours only.")


def _check_kind(encoder, kind: str, node: str, other: str) -> None:
    if encoder is None or not hasattr(encoder, "kind") or not hasattr(encoder, "module"):
        raise CollabNodeError(node, "'encoder' must come from Load Collaborative Model's 'encoder' output")
    if encoder.kind != kind:
        raise CollabNodeError(node, f"the wired encoder is the {encoder.kind} encoder of the '{encoder.modality}' model "
                                    f"({encoder.source}); wire the {kind} model's encoder here, or use {other}")


class CollabTextEncode(CollabNode):
    """Encode a prompt with the text model's own encoder (the reference's BERT-tokenised transformer)."""

    NODE_ID = "CollabTextEncode"
    NAME = "Collaborative Text Encode"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[Encoder.Input("encoder", tooltip="The 'encoder' output of Load Collaborative Model (text model)."),
                    io.String.Input("text", multiline=True, dynamic_prompts=True,
                                    default="This man has beard of medium length. He is in his thirties.",
                                    tooltip="The models were trained on CelebA-Dialog captions about age and beard.")],
            outputs=[io.Conditioning.Output(tooltip="The prompt's tokens, for Collaborative Branch (or any sampler).")])

    @classmethod
    def run(cls, encoder, text):
        node = cls.NAME
        _check_kind(encoder, "text", node, "Collaborative Mask Encode")
        if not text or not text.strip():
            raise CollabNodeError(node, "the text is empty; write a prompt (the models never saw an empty caption)")
        with torch.inference_mode():
            ctx = encoder.module.encode(text)
        return (make_conditioning(ctx.float().cpu()),)


class CollabMaskEncode(CollabNode):
    """Encode a face-parsing mask with the mask model's encoder: a colour picture in the CelebAMask-HQ colours
    (IMAGE) or a label map (MASK from Load Face Mask)."""

    NODE_ID = "CollabMaskEncode"
    NAME = "Collaborative Mask Encode"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[Encoder.Input("encoder", tooltip="The 'encoder' output of Load Collaborative Model (mask model)."),
                    io.Float.Input("tolerance", default=0.0, min=0.0, max=25.0, step=0.5, tooltip=_TOLERANCE_TIP),
                    io.Image.Input("image", optional=True, tooltip="A mask painted in the CelebAMask-HQ colours."),
                    io.Mask.Input("label_mask", optional=True, tooltip="Class labels 0..18 (from Load Face Mask, or "
                                                                       "LoadImageMask of a grey label PNG).")],
            outputs=[io.Conditioning.Output(tooltip="The mask's tokens, for Collaborative Branch (or any sampler).")])

    @classmethod
    def run(cls, encoder, tolerance=0.0, image=None, label_mask=None):
        node = cls.NAME
        _check_kind(encoder, "mask", node, "Collaborative Text Encode")
        labels = labels_from_host(image=image, mask=label_mask, tolerance=tolerance or None)
        with torch.inference_mode():
            ctx = torch.cat([encoder.module.encode(lab) for lab in labels])
        return (make_conditioning(ctx.float().cpu()),)


def _input_images() -> list[str]:
    d = folder_paths.get_input_directory()
    files = [f for f in os.listdir(d) if os.path.isfile(os.path.join(d, f))] if os.path.isdir(d) else []
    return sorted(folder_paths.filter_files_content_types(files, ["image"])) + sorted(host.bundled_masks())


def _mask_path(image: str) -> Optional[str]:
    """The file behind a Load Face Mask choice: a mask shipped with the pack, or a picture in the input folder."""
    bundled = host.bundled_masks().get(image)
    if bundled is not None:
        return str(bundled)
    if folder_paths.exists_annotated_filepath(image):
        return folder_paths.get_annotated_filepath(image)
    return None


class CollabLoadFaceMask(CollabNode):
    """Load a face-parsing mask file keeping its class labels: an indexed PNG (the reference's format, palette
    indices = classes), a grey label PNG, or a picture in the CelebAMask-HQ colours. The stock Load Image
    converts palettes to colours and loses the indices."""

    NODE_ID = "CollabLoadFaceMask"
    NAME = "Load Face Mask"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[io.Combo.Input("image", options=_input_images(), upload=io.UploadType.image,
                                   tooltip="A mask in the input folder (upload one with the button), or one that "
                                           "ships with the pack ([pack] …).")],
            outputs=[io.Mask.Output(display_name="label_mask",
                                    tooltip="Class labels as label/255 (the LoadImageMask convention)."),
                     io.Image.Output(display_name="preview", tooltip="The mask in the class colours.")])

    @classmethod
    def run(cls, image):
        node = cls.NAME
        path = _mask_path(image)
        if path is None:
            raise CollabNodeError(node, f"mask file '{image}' not found in the input folder; upload it with the "
                                        "node's button")
        labels = load_mask(path)
        return (labels_to_host_mask([labels]), labels_to_preview([labels]))

    @classmethod
    def fingerprint_inputs(cls, image):
        path = _mask_path(image)
        if path is None:
            return ""
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @classmethod
    def validate_inputs(cls, image):
        if _mask_path(image) is None:
            return f"mask file '{image}' not found in the input folder; upload it with the node's button"
        return True


class CollabFaceMaskPreview(CollabNode):
    __doc__ = "Show a label map in the CelebAMask-HQ colours (19 classes: " + ", ".join(CLASS_NAMES) + ")."

    NODE_ID = "CollabFaceMaskPreview"
    NAME = "Face Mask Preview"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[io.Mask.Input("label_mask", optional=True, tooltip="Class labels (label/255 or 0..18)."),
                    io.Image.Input("image", optional=True,
                                   tooltip="A colour mask to check: unknown colours raise an error listing them."),
                    io.Float.Input("tolerance", default=0.0, min=0.0, max=25.0, step=0.5, optional=True,
                                   tooltip=_TOLERANCE_TIP)],
            outputs=[io.Image.Output(tooltip="The labels in the CelebAMask-HQ colours.")])

    @classmethod
    def run(cls, label_mask=None, image=None, tolerance=0.0):
        labels = labels_from_host(image=image, mask=label_mask, tolerance=tolerance or None)
        return (labels_to_preview(labels),)


NODES = [CollabTextEncode, CollabMaskEncode, CollabLoadFaceMask, CollabFaceMaskPreview]
