"""Condition nodes: text and mask encoders → standard CONDITIONING, a face-mask loader and a colour preview."""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch

import folder_paths

from ..collab_core.errors import CollabError
from ..collab_core.masks import CLASS_NAMES, load_mask
from . import adapters, host
from .adapters import CATEGORY, CollabNodeError, node_error
from .nodes_loaders import ENCODER


def _check_kind(encoder, kind: str, node: str, other: str) -> None:
    if encoder is None or not hasattr(encoder, "kind") or not hasattr(encoder, "module"):
        raise CollabNodeError(node, "'encoder' must come from Load Collaborative Model's 'encoder' output")
    if encoder.kind != kind:
        raise CollabNodeError(node, f"the wired encoder is the {encoder.kind} encoder of the '{encoder.modality}' model "
                                    f"({encoder.source}); wire the {kind} model's encoder here, or use {other}")


class CollabTextEncode:
    """Encode a prompt with the text model's own encoder (the reference's BERT-tokenised transformer)."""

    NAME = "Collaborative Text Encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "encoder": (ENCODER, {"tooltip": "The 'encoder' output of Load Collaborative Model (text model)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "default": "This man has beard of medium length. He is in his thirties.",
                                "tooltip": "The models were trained on CelebA-Dialog captions about age and beard."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def encode(self, encoder, text):
        node = self.NAME
        _check_kind(encoder, "text", node, "Collaborative Mask Encode")
        if not text or not text.strip():
            raise CollabNodeError(node, "the text is empty; write a prompt (the models never saw an empty caption)")
        try:
            with torch.inference_mode():
                ctx = encoder.module.encode(text)
        except CollabError as err:
            raise node_error(node, err) from err
        return (adapters.make_conditioning(ctx.float().cpu()),)


class CollabMaskEncode:
    """Encode a face-parsing mask with the mask model's encoder: a colour picture in the CelebAMask-HQ colours
    (IMAGE) or a label map (MASK from Load Face Mask)."""

    NAME = "Collaborative Mask Encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "encoder": (ENCODER, {"tooltip": "The 'encoder' output of Load Collaborative Model (mask model)."}),
            "tolerance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 25.0, "step": 0.5,
                                    "tooltip": "For colour pictures: snap colours within this RGB distance to the "
                                               "nearest class colour (JPEG, antialiasing). 0 = exact colours only."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "A mask painted in the CelebAMask-HQ colours."}),
            "label_mask": ("MASK", {"tooltip": "Class labels 0..18 (from Load Face Mask, or LoadImageMask of a grey "
                                               "label PNG)."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def encode(self, encoder, tolerance=0.0, image=None, label_mask=None):
        node = self.NAME
        _check_kind(encoder, "mask", node, "Collaborative Text Encode")
        try:
            labels = adapters.labels_from_host(image=image, mask=label_mask, tolerance=tolerance or None)
            with torch.inference_mode():
                ctx = torch.cat([encoder.module.encode(lab) for lab in labels])
        except CollabError as err:
            raise node_error(node, err) from err
        return (adapters.make_conditioning(ctx.float().cpu()),)


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


class CollabLoadFaceMask:
    """Load a face-parsing mask file keeping its class labels: an indexed PNG (the reference's format, palette
    indices = classes), a grey label PNG, or a picture in the CelebAMask-HQ colours. The stock Load Image
    converts palettes to colours and loses the indices."""

    NAME = "Load Face Mask"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (_input_images(), {"image_upload": True})}}

    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("label_mask", "preview")
    OUTPUT_TOOLTIPS = ("Class labels as label/255 (the LoadImageMask convention).", "The mask in the class colours.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def load(self, image):
        node = self.NAME
        path = _mask_path(image)
        if path is None:
            raise CollabNodeError(node, f"mask file '{image}' not found in the input folder; upload it with the "
                                        "node's button")
        try:
            labels = load_mask(path)
        except CollabError as err:
            raise node_error(node, err) from err
        return (adapters.labels_to_host_mask([labels]), adapters.labels_to_preview([labels]))

    @classmethod
    def IS_CHANGED(cls, image):
        path = _mask_path(image)
        if path is None:
            return ""
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        if _mask_path(image) is None:
            return f"mask file '{image}' not found in the input folder; upload it with the node's button"
        return True


class CollabFaceMaskPreview:
    """Show a label map in the CelebAMask-HQ colours (19 classes: """ + ", ".join(CLASS_NAMES) + ")."

    NAME = "Face Mask Preview"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {
            "label_mask": ("MASK", {"tooltip": "Class labels (label/255 or 0..18)."}),
            "image": ("IMAGE", {"tooltip": "A colour mask to check: unknown colours raise an error listing them."}),
            "tolerance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 25.0, "step": 0.5}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "preview"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def preview(self, label_mask=None, image=None, tolerance=0.0):
        node = self.NAME
        try:
            labels = adapters.labels_from_host(image=image, mask=label_mask, tolerance=tolerance or None)
            return (adapters.labels_to_preview(labels),)
        except CollabError as err:
            raise node_error(node, err) from err


NODE_CLASS_MAPPINGS = {
    "CollabTextEncode": CollabTextEncode,
    "CollabMaskEncode": CollabMaskEncode,
    "CollabLoadFaceMask": CollabLoadFaceMask,
    "CollabFaceMaskPreview": CollabFaceMaskPreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: v.NAME for k, v in NODE_CLASS_MAPPINGS.items()}
