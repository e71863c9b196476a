"""Face nodes for editing your own photo: load a face parser, parse a photo, paint face classes with the front
end's mask editor, crop the face to the model's size and paste the edit back at the photo's full resolution.

The work is ``collab_core``'s (``face_parsing``, ``editing.crop``); these classes adapt host types. Label maps
travel as label MASKs (class index / 255, the Load Face Mask convention), so the editing nodes take them as is.
A typical graph: Load Image (paint strokes in its mask editor) → Face Parse → Paint Face Region → Face Crop →
VAE Encode / Collaborative Mask Encode → DDIM Inversion → Resample From Inversion → VAE Decode → Face Paste Back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import comfy.model_management
import folder_paths

from ..collab_core.editing.crop import Box, crop_box_from, crop_to_model, grow_region, paint_region, paste_back
from ..collab_core.face_parsing import FaceParser, demo_parser_dir
from ..collab_core.masks import CLASS_NAMES
from .errors import CollabNodeError
from .labels import labels_from_host, labels_to_host_mask, labels_to_preview
from .schema import CATEGORY, CollabNode, io

FACE_CATEGORY = CATEGORY + "/face"
#: models/face_parsing: one folder per parser (config.json, model.safetensors, preprocessor_config.json).
PARSER_FOLDER = "face_parsing"
DEMO_PARSER = "[pack] demo_face_parser"

FaceParserType = io.Custom("COLLAB_FACE_PARSER")
FaceCropType = io.Custom("COLLAB_FACE_CROP")


def register_parser_folder() -> None:
    """Add ``models/face_parsing`` to the host's model folders (keeping paths a user configured)."""
    default = os.path.join(folder_paths.models_dir, PARSER_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(PARSER_FOLDER)
    paths = list(entry[0]) if entry else []
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[PARSER_FOLDER] = (paths, set(entry[1]) if entry else {".json"})


def parser_folders() -> dict[str, Path]:
    """Parser name → folder: every sub-folder of the face_parsing paths with a config.json, and the demo parser."""
    found = {}
    demo = demo_parser_dir()
    if demo is not None:
        found[DEMO_PARSER] = demo
    for base in folder_paths.get_folder_paths(PARSER_FOLDER):
        if os.path.isdir(base):
            for name in sorted(os.listdir(base)):
                if os.path.isfile(os.path.join(base, name, "config.json")):
                    found.setdefault(name, Path(base) / name)
    return found


def _one_labels(mask, what: str, node: str) -> np.ndarray:
    if mask is None:
        raise CollabNodeError(node, f"'{what}' is not connected")
    maps = labels_from_host(mask=mask)
    if len(maps) != 1:
        raise CollabNodeError(node, f"'{what}' holds {len(maps)} label maps; edit one photo at a time")
    return maps[0]


def _one_image(image, node: str, what: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (3, 4):
        raise CollabNodeError(node, f"'{what}' must be an IMAGE [1, H, W, 3]")
    if image.shape[0] != 1:
        raise CollabNodeError(node, f"'{what}' holds {image.shape[0]} pictures; edit one photo at a time")
    return image[..., :3].float().clamp(0, 1)


def _image_out(rgb: np.ndarray) -> torch.Tensor:
    """uint8 or float 0..1 [H, W, 3] → IMAGE [1, H, W, 3]."""
    arr = rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr))[None]


class CollabLoadFaceParser(CollabNode):
    """Load a face parser: a Segformer trained on CelebAMask-HQ, as a folder under models/face_parsing
    (config.json, model.safetensors, preprocessor_config.json — the layout of the public face-parsing models).
    Its labels are matched to the pack's 19 classes by name. The pack's tiny demo parser (trained on the demo's
    synthetic faces) is listed as '[pack] demo_face_parser'."""

    NODE_ID = "CollabLoadFaceParser"
    NAME = "Load Face Parser"

    @classmethod
    def define_schema(cls):
        names = list(parser_folders()) or [DEMO_PARSER]
        return cls.schema(
            inputs=[io.Combo.Input("parser", options=names,
                                   tooltip="A parser folder in models/face_parsing, or the pack's demo parser.")],
            outputs=[FaceParserType.Output(display_name="face_parser", tooltip="For Face Parse.")],
            category=FACE_CATEGORY)

    @classmethod
    def run(cls, parser):
        folder = parser_folders().get(parser)
        if folder is None:
            where = ", ".join(folder_paths.get_folder_paths(PARSER_FOLDER))
            raise CollabNodeError(cls.NAME, f"face parser '{parser}' not found; put its folder (config.json, "
                                            f"model.safetensors, preprocessor_config.json) in one of: {where}, then "
                                            "press R in the browser to refresh the list")
        return (FaceParser.from_folder(folder, device=comfy.model_management.get_torch_device()),)

    @classmethod
    def validate_inputs(cls, parser):
        return True if parser in parser_folders() else f"face parser '{parser}' not found in models/{PARSER_FOLDER}"


class CollabFaceParse(CollabNode):
    """Parse a photo of any size into the 19-class face mask (label MASK at the photo's size) and its colour
    preview. Wire the label mask into Paint Face Region to repaint classes, or into Face Crop."""

    NODE_ID = "CollabFaceParse"
    NAME = "Face Parse"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[FaceParserType.Input("face_parser", tooltip="Load Face Parser."),
                    io.Image.Input("image", tooltip="The photo (any size).")],
            outputs=[io.Mask.Output(display_name="label_mask", tooltip="Class labels as label/255, the photo's size."),
                     io.Image.Output(display_name="preview", tooltip="The parsed mask in the class colours.")],
            category=FACE_CATEGORY)

    @classmethod
    def run(cls, face_parser, image):
        if not isinstance(face_parser, FaceParser):
            raise CollabNodeError(cls.NAME, "'face_parser' must come from Load Face Parser")
        labels = [face_parser.parse(image[i:i + 1, ..., :3].float().clamp(0, 1)) for i in range(image.shape[0])]
        return (labels_to_host_mask(labels), labels_to_preview(labels))


class CollabPaintFaceRegion(CollabNode):
    """Paint a face class into a label mask: the white pixels of 'painted' (e.g. the MASK of Load Image after
    painting in its mask editor) take the chosen class, widened by 'grow' and smoothed by 'feather' pixels.
    Chain several to repaint hair, then a beard, then glasses."""

    NODE_ID = "CollabPaintFaceRegion"
    NAME = "Paint Face Region"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[io.Mask.Input("label_mask", tooltip="Class labels (Face Parse, Load Face Mask, or another "
                                                        "Paint Face Region)."),
                    io.Mask.Input("painted", tooltip="White = paint here; the label mask's size (the mask editor of "
                                                     "Load Image on the same photo)."),
                    io.Combo.Input("face_class", options=list(CLASS_NAMES), default="hair",
                                   tooltip="The class the painted pixels take."),
                    io.Int.Input("grow", default=0, min=0, max=256, tooltip="Widen the strokes by N pixels."),
                    io.Float.Input("feather", default=0.0, min=0.0, max=64.0, step=0.5,
                                   tooltip="Round off the strokes' edges (pixels); the result stays a label map.")],
            outputs=[io.Mask.Output(display_name="label_mask", tooltip="The repainted labels."),
                     io.Image.Output(display_name="preview", tooltip="The repainted mask in the class colours.")],
            category=FACE_CATEGORY)

    @classmethod
    def run(cls, label_mask, painted, face_class="hair", grow=0, feather=0.0):
        node = cls.NAME
        labels = _one_labels(label_mask, "label_mask", node)
        strokes = painted[0] if painted.dim() == 3 else painted
        if tuple(strokes.shape) != labels.shape:
            hint = (" Load Image gives an empty 64×64 MASK for a picture without painted strokes: open its mask "
                    "editor and paint" if tuple(strokes.shape) == (64, 64) else "")
            raise CollabNodeError(node, f"the painted MASK is {strokes.shape[1]}×{strokes.shape[0]} but the label "
                                        f"mask {labels.shape[1]}×{labels.shape[0]}; paint on the same photo.{hint}")
        if not bool((strokes > 0.5).any()):
            raise CollabNodeError(node, "the painted MASK is empty: open the mask editor on the photo (right-click "
                                        "Load Image → Open in MaskEditor), paint the region, save")
        out = paint_region(labels, strokes.cpu().numpy(), face_class, grow=int(grow), feather=float(feather))
        return (labels_to_host_mask([out]), labels_to_preview([out]))


@dataclass
class FaceCrop:
    """Where Face Crop cut the photo: Face Paste Back puts the edit back there."""

    box: Box  # (x, y, w, h) in the photo
    photo_hw: tuple[int, int]
    size: int


class CollabFaceCrop(CollabNode):
    """Cut the face out of a photo of any size and resize it to the model's size (512 or 256 for the official
    models, 64 for the demo). The box is 'auto' (the square around the parsed face, with a margin) or x,y,w,h in
    pixels. Label masks are cut the same way (nearest-neighbour, labels stay labels)."""

    NODE_ID = "CollabFaceCrop"
    NAME = "Face Crop"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[io.Image.Input("image", tooltip="The photo."),
                    io.Mask.Input("label_mask", tooltip="The photo's own labels (Face Parse); 'auto' finds the face "
                                                        "in them."),
                    io.String.Input("box", default="auto", tooltip="auto, or x,y,w,h in pixels of the photo."),
                    io.Float.Input("margin", default=0.2, min=0.0, max=10.0, step=0.05,
                                   tooltip="With auto: margin on each side, a fraction of the face's size."),
                    io.Int.Input("size", default=512, min=8, max=4096, step=8,
                                 tooltip="The model's picture size: 512 / 256 (official), 64 (demo)."),
                    io.Mask.Input("target_labels", optional=True,
                                  tooltip="The repainted labels (Paint Face Region), cut the same way.")],
            outputs=[io.Image.Output(display_name="image", tooltip="The face at the model's size."),
                     io.Mask.Output(display_name="label_mask", tooltip="The photo's labels, cut."),
                     io.Mask.Output(display_name="target_labels", tooltip="The repainted labels, cut (the photo's "
                                                                          "when none are connected)."),
                     FaceCropType.Output(display_name="crop", tooltip="For Face Paste Back.")],
            category=FACE_CATEGORY)

    @classmethod
    def run(cls, image, label_mask, box="auto", margin=0.2, size=512, target_labels=None):
        node = cls.NAME
        photo = _one_image(image, node)[0].cpu().numpy()
        labels = _one_labels(label_mask, "label_mask", node)
        target = _one_labels(target_labels, "target_labels", node) if target_labels is not None else labels
        for what, lab in (("label_mask", labels), ("target_labels", target)):
            if lab.shape != photo.shape[:2]:
                raise CollabNodeError(node, f"'{what}' is {lab.shape[1]}×{lab.shape[0]} but the photo "
                                            f"{photo.shape[1]}×{photo.shape[0]}; parse the same photo")
        b = crop_box_from(box, photo, labels=labels, margin=float(margin), name="box")
        crop = FaceCrop(box=b, photo_hw=photo.shape[:2], size=int(size))
        return (_image_out(crop_to_model(photo, b, int(size))), labels_to_host_mask([crop_to_model(labels, b, size)]),
                labels_to_host_mask([crop_to_model(target, b, size)]), crop)


class CollabFacePasteBack(CollabNode):
    """Paste an edited face crop back into the original photo at its full resolution. Outside the region (and
    outside the crop box) every pixel is the photo's own, bit for bit; the edit fades in over 'seam' pixels inside
    the region's border. Without a region the whole box is replaced."""

    NODE_ID = "CollabFacePasteBack"
    NAME = "Face Paste Back"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            inputs=[io.Image.Input("original", tooltip="The photo Face Crop cut."),
                    io.Image.Input("edited", tooltip="The edited crop (VAE Decode)."),
                    FaceCropType.Input("crop", tooltip="Face Crop's 'crop' output."),
                    io.Int.Input("grow", default=8, min=0, max=256,
                                 tooltip="Widen the region by N pixels of its own size (the edit reaches a little "
                                         "past the changed classes: Resample From Inversion grows them by latent "
                                         "pixels)."),
                    io.Int.Input("seam", default=8, min=0, max=256,
                                 tooltip="Pixels over which the edit fades in at the region's border (0 = hard)."),
                    io.Mask.Input("region", optional=True,
                                  tooltip="White = the edit may change it (Face Mask Difference of the cut labels); "
                                          "the crop's or the photo's size.")],
            outputs=[io.Image.Output(tooltip="The photo with the edit, at its full resolution.")],
            category=FACE_CATEGORY)

    @classmethod
    def run(cls, original, edited, crop, grow=8, seam=8, region=None):
        node = cls.NAME
        if not isinstance(crop, FaceCrop):
            raise CollabNodeError(node, "'crop' must come from Face Crop")
        photo = _one_image(original, node, "original")
        if tuple(photo.shape[1:3]) != tuple(crop.photo_hw):
            raise CollabNodeError(node, f"'original' is {photo.shape[2]}×{photo.shape[1]} but Face Crop cut a "
                                        f"{crop.photo_hw[1]}×{crop.photo_hw[0]} photo; wire the same photo")
        ed = _one_image(edited, node, "edited")[0].cpu().numpy()
        if region is None:
            reg = np.ones(ed.shape[:2], dtype=bool)
        else:
            reg = grow_region((region[0] if region.dim() == 3 else region).cpu().numpy() > 0.5, int(grow))
        out = paste_back(photo.cpu().numpy()[0], ed, crop.box, reg, int(seam))
        return (_image_out(out),)


register_parser_folder()

NODES = [CollabLoadFaceParser, CollabFaceParse, CollabPaintFaceRegion, CollabFaceCrop, CollabFacePasteBack]
