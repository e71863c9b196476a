"""The face nodes inside ComfyUI (Load Face Parser, Face Parse, Paint Face Region, Face Crop, Face Paste Back) and
the shipped workflows/edit_my_photo.json on the demo models: a 200×260 photo whose strokes were painted in the
mask editor (its alpha) → parse → paint hair → crop the face to 64 px → invert and resample → paste back."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hostutil import REPO, call, combo_options

FACE = {
    "CollabLoadFaceParser": "Load Face Parser",
    "CollabFaceParse": "Face Parse",
    "CollabPaintFaceRegion": "Paint Face Region",
    "CollabFaceCrop": "Face Crop",
    "CollabFacePasteBack": "Face Paste Back",
}
PHOTO = "edit_my_photo_example.png"
WORKFLOW = REPO / "workflows" / "edit_my_photo.json"
HAIR = 13


@pytest.fixture(scope="module")
def photo(host):
    shutil.copy(REPO / "workflows" / PHOTO, host.base / "input" / PHOTO)
    rgba = np.asarray(Image.open(REPO / "workflows" / PHOTO))
    return rgba[..., :3], rgba[..., 3] == 0  # the picture and the painted strokes


def ok(r):
    assert r.valid, (r.error, r.node_errors)
    assert r.success, [m for m in r.messages if m[0] == "execution_error"]
    return r


def ui_to_api(host, wf: dict) -> dict:
    from test_editing import _ui_to_api

    return _ui_to_api(host, wf)


def test_face_nodes_register_and_list_the_demo_parser(host):
    for name, display in FACE.items():
        assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS[name] == display
        assert host.mappings[name].CATEGORY == "collaborative_diffusion/face"
    options = combo_options(host.mappings["CollabLoadFaceParser"].INPUT_TYPES()["required"]["parser"])
    assert "[pack] demo_face_parser" in options
    assert "face_parsing" in host.folder_paths.folder_names_and_paths


def test_parse_paint_crop_paste_chain(host, photo):
    rgb, strokes = photo
    image = torch.from_numpy(rgb.astype(np.float32) / 255)[None]
    parser = call(host, "CollabLoadFaceParser", parser="[pack] demo_face_parser")[0]
    labels, preview = call(host, "CollabFaceParse", face_parser=parser, image=image)
    assert labels.shape == (1, 260, 200) and preview.shape == (1, 260, 200, 3)
    painted = torch.from_numpy(strokes.astype(np.float32))[None]
    target, _ = call(host, "CollabPaintFaceRegion", label_mask=labels, painted=painted, face_class="hair", grow=0,
                     feather=0.0)
    lab_t = torch.round(target[0] * 255).long().numpy()
    assert (lab_t[strokes] == HAIR).all()
    # Chainable: glasses on top of the new hair, the hair stays where not repainted.
    eyes = np.zeros_like(strokes)
    eyes[100:110, 60:140] = True
    again = call(host, "CollabPaintFaceRegion", label_mask=target, painted=torch.from_numpy(eyes.astype(np.float32))[None],
                 face_class="eye_g", grow=0, feather=0.0)[0]
    lab_g = torch.round(again[0] * 255).long().numpy()
    assert (lab_g[eyes] == 3).all() and (lab_g[strokes & ~eyes] == HAIR).all()
    crop_img, crop_src, crop_tgt, crop = call(host, "CollabFaceCrop", image=image, label_mask=labels, box="auto",
                                              margin=0.2, size=64, target_labels=target)
    assert crop_img.shape == (1, 64, 64, 3) and crop_src.shape == crop_tgt.shape == (1, 64, 64)
    edited = torch.zeros_like(crop_img)  # a black "edit": the paste must bound it to the region
    region = call(host, "CollabMaskDifference", source_labels=crop_src, target_labels=crop_tgt)[0]
    pasted = call(host, "CollabFacePasteBack", original=image, edited=edited, crop=crop, grow=0, seam=0,
                  region=region)[0]
    assert pasted.shape == image.shape
    from collab_core.editing.crop import region_in_photo

    allowed = region_in_photo(region[0].numpy() > 0.5, crop.box, (260, 200), (64, 64))
    assert torch.equal(pasted[0][torch.from_numpy(~allowed)], image[0][torch.from_numpy(~allowed)])
    assert float(pasted[0][torch.from_numpy(allowed)].max()) == 0.0
    whole = call(host, "CollabFacePasteBack", original=image, edited=edited, crop=crop, grow=0, seam=8)[0]
    x, y, w, h = crop.box
    outside = torch.ones(260, 200, dtype=torch.bool)
    outside[y:y + h, x:x + w] = False
    assert torch.equal(whole[0][outside], image[0][outside])


def test_face_node_errors(host, photo):
    rgb, strokes = photo
    image = torch.from_numpy(rgb.astype(np.float32) / 255)[None]
    parser = call(host, "CollabLoadFaceParser", parser="[pack] demo_face_parser")[0]
    labels = call(host, "CollabFaceParse", face_parser=parser, image=image)[0]
    with pytest.raises(Exception, match=r"\[Paint Face Region\].*empty 64×64 MASK"):
        call(host, "CollabPaintFaceRegion", label_mask=labels, painted=torch.zeros(1, 64, 64), face_class="hair")
    with pytest.raises(Exception, match=r"\[Paint Face Region\].*painted MASK is empty"):
        call(host, "CollabPaintFaceRegion", label_mask=labels, painted=torch.zeros(1, 260, 200), face_class="hair")
    with pytest.raises(Exception, match=r"\[Face Crop\].*reaches past the 200×260 picture"):
        call(host, "CollabFaceCrop", image=image, label_mask=labels, box="150,150,100,100", margin=0.2, size=64)
    with pytest.raises(Exception, match=r"\[Face Crop\].*no face found"):
        call(host, "CollabFaceCrop", image=image, label_mask=torch.zeros(1, 260, 200), box="auto", margin=0.2, size=64)
    with pytest.raises(Exception, match=r"\[Face Parse\].*Load Face Parser"):
        call(host, "CollabFaceParse", face_parser="nope", image=image)
    r = host.run({"p": {"class_type": "CollabLoadFaceParser", "inputs": {"parser": "missing"}},
                  "f": {"class_type": "CollabFaceParse", "inputs": {"face_parser": ["p", 0], "image": ["i", 0]}},
                  "i": {"class_type": "LoadImage", "inputs": {"image": PHOTO}},
                  "s": {"class_type": "PreviewImage", "inputs": {"images": ["f", 1]}}})
    assert not r.valid and "missing" in json.dumps(r.node_errors)


def test_edit_my_photo_workflow_runs_on_the_demo_models(host, photo):
    rgb, strokes = photo
    prompt = ui_to_api(host, json.loads(WORKFLOW.read_text()))
    for n in prompt.values():
        if "steps" in n["inputs"]:
            n["inputs"]["steps"] = 10  # the shipped 50 work too; fewer keep the test short
    r = ok(host.run(prompt))
    by_type = {n["class_type"]: k for k, n in prompt.items()}
    result = r.outputs[by_type["CollabFacePasteBack"]][0][0]
    crop = r.outputs[by_type["CollabFaceCrop"]][3][0]
    region = r.outputs[by_type["CollabMaskDifference"]][0][0]
    image = torch.from_numpy(rgb.astype(np.float32) / 255)
    assert result.shape == (1, 260, 200, 3)
    from collab_core.editing.crop import grow_region, region_in_photo

    grow = prompt[by_type["CollabFacePasteBack"]]["inputs"]["grow"]
    allowed = region_in_photo(grow_region(region[0].numpy() > 0.5, grow), crop.box, (260, 200), (64, 64))
    assert 0 < allowed.sum() < allowed.size / 4
    keep = torch.from_numpy(~allowed)
    assert torch.equal(result[0][keep], image[keep]), "a pixel outside the edited region changed"
    assert float((result[0][~keep] - image[~keep]).abs().max()) > 0.05, "the painted region did not change"
    assert list((host.base / "output").rglob("edit_my_photo*.png"))
