"""Face parsing of any picture (collab_core.face_parsing) and photos of any size (collab_core.editing.crop).

A tiny random Segformer saved in the layout of the public CelebAMask-HQ face parsers stands in for a real one; the
synthetic face generator gives pictures and their true label maps.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from collab_core.editing.crop import crop_box_from, crop_to_model, paint_region, paste_alpha, paste_back
from collab_core.errors import CollabError, InputError
from collab_core.face_parsing import (BODY_CLASSES, LABEL_ALIASES, FaceParser, FaceParserError, NoFaceError,
                                      Preprocess, canonical_class, check_left_right, face_box, map_labels, parse_face,
                                      upsampled_argmax)
from collab_core.face_parsing import _bilinear_matrix
from collab_core.masks import CLASS_NAMES
from collab_core.training.synthetic import face_sample

C = {n: i for i, n in enumerate(CLASS_NAMES)}

# jonathandinu/face-parsing's config.json id2label: CelebAMask-HQ's short spelling, in CelebAMask-HQ's order.
JONATHANDINU = {str(i): n for i, n in enumerate(
    ["background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth",
     "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth"])}
# The long spelling other parsers use, in another order (mapping is by name, not by position).
LONG = ["Background", "Skin", "Nose", "Eyeglasses", "Left Eye", "Right Eye", "Left-Eyebrow", "right_eyebrow",
        "left_ear", "right_ear", "mouth", "upper_lip", "lower_lip", "hair", "hat", "earring", "necklace", "neck",
        "clothes"]
PERM = [13, 0, 18, 4, 1, 17, 5, 2, 12, 3, 6, 16, 11, 7, 15, 8, 10, 14, 9]  # model index i holds class PERM[i]
PREPROCESSOR = {"do_normalize": True, "do_reduce_labels": False, "do_rescale": True, "do_resize": True,
                "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "SegformerImageProcessor",
                "image_std": [0.229, 0.224, 0.225], "resample": 2, "rescale_factor": 0.00392156862745098,
                "size": {"height": 64, "width": 64}}


def _tiny_segformer(id2label):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    cfg = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 16, 16], num_attention_heads=[1, 1, 1, 1],
                          mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=16, num_labels=len(id2label),
                          id2label={int(k): v for k, v in id2label.items()},
                          label2id={v: int(k) for k, v in id2label.items()})
    return SegformerForSemanticSegmentation(cfg).eval()


def _save(model, folder, preprocessor=PREPROCESSOR):
    model.save_pretrained(folder, safe_serialization=True)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="module")
def parser_dir(tmp_path_factory):
    return _save(_tiny_segformer(JONATHANDINU), tmp_path_factory.mktemp("face-parsing"))


@pytest.fixture(scope="module")
def photo():
    """A synthetic face 200 wide × 260 high, and its true label map at that size."""
    s = face_sample(3, seed=0, split="test", size=256)
    image = np.asarray(Image.fromarray(s.image).resize((200, 260), Image.Resampling.BICUBIC))
    labels = np.asarray(Image.fromarray(s.labels.astype(np.uint8)).resize((200, 260), Image.Resampling.NEAREST),
                        dtype=np.int64)
    return image, labels


# ------------------------------------------------------------------------------------------- label names


def test_alias_table_names_every_class_once():
    assert list(LABEL_ALIASES) == list(CLASS_NAMES)
    seen = {}
    for cls, spellings in LABEL_ALIASES.items():
        assert spellings[0] == cls
        for s in spellings:
            assert s not in seen, f"{s!r} names {seen.get(s)} and {cls}"
            seen[s] = cls
    assert canonical_class("ear_r") == "ear_r"  # CelebAMask-HQ's earring, never the right ear
    assert canonical_class("Right Ear") == "r_ear"
    assert canonical_class("eye_g") == canonical_class("glasses") == "eye_g"
    assert canonical_class("Left-Eyebrow") == "l_brow" and canonical_class("beard") is None


def test_both_spellings_map_by_name():
    assert map_labels(JONATHANDINU) == {n: i for i, n in enumerate(CLASS_NAMES)}
    long_shuffled = {i: LONG[PERM[i]] for i in range(19)}
    mapping = map_labels(long_shuffled)
    assert all(PERM[mapping[n]] == C[n] for n in CLASS_NAMES)


def test_model_missing_a_class_is_refused_by_name():
    no_hat = dict(JONATHANDINU, **{"14": "beard"})
    with pytest.raises(FaceParserError, match=r"1 of the pack's 19 classes: hat") as e:
        map_labels(no_hat)
    assert isinstance(e.value, CollabError) and "'beard'" in str(e.value)
    with pytest.raises(FaceParserError, match="more than once"):
        map_labels(dict(JONATHANDINU, **{"14": "skin"}))
    # extra labels are allowed and ignored
    assert map_labels(dict(JONATHANDINU, **{"19": "beard"}))["hat"] == 14


# ------------------------------------------------------------------------------------------- the folder


def test_folder_errors(tmp_path, parser_dir):
    with pytest.raises(FaceParserError, match="never downloads.*huggingface-cli download"):
        FaceParser.from_folder("jonathandinu/face-parsing")
    with pytest.raises(FaceParserError, match="does not exist"):
        FaceParser.from_folder(tmp_path / "nowhere")
    with pytest.raises(FaceParserError, match="no config.json"):
        FaceParser.from_folder(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(FaceParserError, match="is a file"):
        FaceParser.from_folder(tmp_path / "f.txt")

    other = tmp_path / "other"
    shutil.copytree(parser_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    with pytest.raises(FaceParserError, match="'bert' model, not a Segformer"):
        FaceParser.from_folder(other)

    noweights = tmp_path / "noweights"
    shutil.copytree(parser_dir, noweights)
    (noweights / "model.safetensors").rename(noweights / "pytorch_model.bin")
    with pytest.raises(FaceParserError, match="no weights: model.safetensors is missing.*pickle"):
        FaceParser.from_folder(noweights)

    misfit = tmp_path / "misfit"
    shutil.copytree(parser_dir, misfit)
    (misfit / "config.json").write_text(json.dumps(dict(cfg, hidden_sizes=[8, 8, 16, 32])))
    with pytest.raises(FaceParserError, match="misfit"):
        FaceParser.from_folder(misfit)

    noprep = tmp_path / "noprep"
    shutil.copytree(parser_dir, noprep)
    (noprep / "preprocessor_config.json").unlink()
    with pytest.warns(UserWarning, match="no preprocessor_config.json"):
        assert FaceParser.from_folder(noprep).preprocess.size == (512, 512)


def test_preprocess_reads_the_processor_config():
    p = Preprocess.from_dict(PREPROCESSOR)
    assert p.size == (64, 64)
    x = p(np.full((30, 50, 3), 128, np.uint8))
    assert x.shape == (1, 3, 64, 64)
    expect = (128 / 255 - np.array(PREPROCESSOR["image_mean"])) / np.array(PREPROCESSOR["image_std"])
    assert np.allclose(x[0, :, 10, 10].numpy(), expect, atol=1e-5)
    with pytest.raises(FaceParserError, match="image_std"):
        Preprocess.from_dict(dict(PREPROCESSOR, image_std=[0.2, 0.2]))


# ------------------------------------------------------------------------------------------- parsing


def test_parse_a_picture_of_its_own_size(parser_dir, photo):
    image, _ = photo
    parser = FaceParser.from_folder(parser_dir)
    labels = parse_face(image, parser)
    assert labels.shape == (260, 200) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() <= 18
    assert np.array_equal(parse_face(Image.fromarray(image), parser), labels)
    assert parse_face(image.astype(np.float32) / 255.0, parser).shape == (260, 200)
    assert parser.logits(image).shape == (19, 16, 16)


def test_outputs_are_reordered_into_our_classes(tmp_path, photo):
    image, _ = photo
    model = _tiny_segformer({i: LONG[PERM[i]] for i in range(19)})
    hat_output = PERM.index(C["hat"])  # the model's output index that its id2label calls "hat"
    with torch.no_grad():
        model.decode_head.classifier.weight.zero_()
        model.decode_head.classifier.bias.zero_()
        model.decode_head.classifier.bias[hat_output] = 5.0
    parser = FaceParser.from_folder(_save(model, tmp_path / "long"))
    assert (parser.parse(image) == C["hat"]).all()
    with torch.no_grad():
        parser.model.decode_head.classifier.bias.zero_()
        parser.model.decode_head.classifier.bias[PERM.index(C["l_eye"])] = 5.0
    parser.mirrored = True
    assert (parser.parse(image) == C["r_eye"]).all()


def test_banded_upsampling_is_bilinear_interpolation():
    torch.manual_seed(0)
    logits = torch.randn(19, 7, 9)
    ref = F.interpolate(logits[None], size=(23, 31), mode="bilinear", align_corners=False)[0]
    mine = torch.einsum("Yh,chw,Xw->cYX", _bilinear_matrix(23, 7), logits, _bilinear_matrix(31, 9))
    assert torch.allclose(ref, mine, atol=1e-5)
    assert np.array_equal(upsampled_argmax(logits, (23, 31), band_elements=19 * 31 * 3), ref.argmax(0).numpy())


class _Oracle(torch.nn.Module):
    """A stand-in parser that 'sees' a known label map: one-hot logits at a quarter of the input size."""

    def __init__(self, labels, mirrored=False):
        super().__init__()
        lab = labels.copy()
        if mirrored:  # the other convention: left = the picture's left
            for a, b in (("l_eye", "r_eye"), ("l_brow", "r_brow"), ("l_ear", "r_ear")):
                lab[labels == C[a]], lab[labels == C[b]] = C[b], C[a]
        self.register_buffer("onehot", F.one_hot(torch.from_numpy(lab), 19).permute(2, 0, 1)[None].float())

    def forward(self, pixel_values):
        h, w = pixel_values.shape[-2] // 4, pixel_values.shape[-1] // 4
        return F.interpolate(self.onehot, size=(h, w), mode="area") * 10.0


def test_left_right_check_keeps_or_swaps(photo):
    image, truth = photo
    prep = Preprocess(size=(256, 256))
    good = FaceParser(_Oracle(truth), JONATHANDINU, prep)
    r = check_left_right(good, image)
    assert not r.mirrored and not r.swapped and not good.mirrored and r.pairs["l_eye/r_eye"]
    assert "picture's right" in r.convention
    # our convention, as the synthetic generator paints it: the person's left eye on the picture's right
    assert np.nonzero(truth == C["l_eye"])[1].mean() > np.nonzero(truth == C["r_eye"])[1].mean()

    flipped = FaceParser(_Oracle(truth, mirrored=True), JONATHANDINU, prep)
    r = check_left_right(flipped, image, truth)
    assert r.mirrored and r.swapped and flipped.mirrored
    fixed = flipped.parse(image)
    for cls in ("l_eye", "r_eye", "l_brow", "r_brow"):
        assert ((fixed == C[cls]) & (truth == C[cls])).sum() > 0.6 * (truth == C[cls]).sum()
    assert not check_left_right(flipped, image).mirrored  # once fixed, the check passes

    blank = FaceParser(_Oracle(np.zeros_like(truth)), JONATHANDINU, prep)
    with pytest.raises(FaceParserError, match="no pair of eyes"):
        check_left_right(blank, image)


# ------------------------------------------------------------------------------------------- the face box


def test_face_box_around_the_head(photo):
    _, truth = photo
    x, y, w, h = face_box(truth, margin=0.2)
    assert w == h and 0 <= x and 0 <= y and x + w <= 200 and y + h <= 260
    head = ~np.isin(truth, [C[c] for c in BODY_CLASSES])
    ys, xs = np.nonzero(head)
    assert x <= xs.min() and xs.max() < x + w and y <= ys.min() and ys.max() < y + h
    tight = face_box(truth, margin=0)
    assert tight[2] == max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert face_box(truth, margin=0.1)[2] < w
    assert face_box(truth, margin=5)[2] == 200  # clipped to the picture's smaller side
    with pytest.raises(NoFaceError, match="no face found"):
        face_box(np.zeros((40, 30), np.int64))
    corner = np.zeros((100, 120), np.int64)
    corner[0:10, 110:120] = C["skin"]
    bx, by, bw, bh = face_box(corner, margin=0.5)
    assert (bx, by, bw) == (100, 0, 20) and bh == bw  # moved inside the picture


# ------------------------------------------------------------------------------------------- crop / paste


def test_crop_box_parsing_and_errors(photo):
    image, truth = photo
    assert crop_box_from("auto", image, labels=truth) == face_box(truth)
    assert crop_box_from(" 10, 20 ,30,40", image) == (10, 20, 30, 40)
    assert crop_box_from((0, 0, 200, 260), (200, 260)) == (0, 0, 200, 260)
    bad = {"abc": "not a box", "1,2,3": "not a box", "1.5,2,3,4": "not a box", "0,0,0,10": "must be positive",
           "-1,0,10,10": "outside the picture", "0,0,201,10": "reaches past the 200×260", "0,250,10,11": "y \\+ h"}
    for arg, message in bad.items():
        with pytest.raises(InputError, match=message):
            crop_box_from(arg, image)
    with pytest.raises(InputError, match="needs the picture's face-parsing label map"):
        crop_box_from("auto", image)
    with pytest.raises(InputError, match="whole numbers"):
        crop_box_from((0, 0, 10.5, 10), image)


def test_crop_to_model(photo):
    image, truth = photo
    box = face_box(truth)
    crop = crop_to_model(image, box, 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    lab = crop_to_model(truth, box, 64)
    assert lab.shape == (64, 64) and lab.dtype == np.int64
    assert set(np.unique(lab)) <= set(np.unique(truth))
    fcrop = crop_to_model(image.astype(np.float32) / 255, box, 64)
    assert fcrop.dtype == np.float32 and np.abs(fcrop * 255 - crop).max() <= 1.01
    with pytest.raises(InputError, match="reaches past"):
        crop_to_model(image, (150, 0, 100, 100), 64)


def _chessboard_depth(region):
    """Distance of each region pixel to the nearest pixel outside it (the map's edge is outside), by brute force."""
    ys, xs = np.nonzero(~np.pad(region, 1))
    out = np.zeros(region.shape, int)
    for y, x in zip(*np.nonzero(region)):
        out[y, x] = np.max(np.stack([np.abs(ys - 1 - y), np.abs(xs - 1 - x)]), axis=0).min()
    return out


def test_paste_back_keeps_outside_exact_and_feathers_inside():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (300, 220, 3), dtype=np.uint8)
    edited = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    box = (30, 50, 128, 128)
    region = np.zeros((300, 220), bool)
    yy, xx = np.mgrid[:300, :220]
    region[(yy - 110) ** 2 + (xx - 90) ** 2 < 45 ** 2] = True
    region[60:70, 150:219] = True  # part of it lies outside the box: not editable
    out = paste_back(original, edited, box, region, feather_px=8)
    assert out.shape == original.shape and out.dtype == np.uint8
    x, y, w, h = box
    in_box = np.zeros_like(region)
    in_box[y:y + h, x:x + w] = True
    editable = region & in_box
    assert np.array_equal(out[~editable], original[~editable])  # bit-identical outside the edited region

    big = np.asarray(Image.fromarray(edited).resize((w, h), Image.Resampling.BICUBIC)).astype(int)
    depth = np.zeros(region.shape, int)
    depth[y:y + h, x:x + w] = _chessboard_depth(editable[y:y + h, x:x + w])
    deep = depth > 8
    assert np.abs(out[deep].astype(int) - big[(depth > 8)[y:y + h, x:x + w]]).max() <= 1  # the edit itself
    alpha = paste_alpha(editable[y:y + h, x:x + w], 8)
    partial = (alpha > 0) & (alpha < 1)
    assert partial.any() and depth[y:y + h, x:x + w][partial].max() == 8 and depth[y:y + h, x:x + w][partial].min() == 1
    assert np.allclose(alpha[partial], depth[y:y + h, x:x + w][partial] / 9)

    # region given at the edited crop's size; a float ComfyUI IMAGE round trip; a hard seam
    small = np.zeros((64, 64), bool)
    small[16:48, 16:48] = True
    img = torch.from_numpy(original.astype(np.float32) / 255)[None]
    out_f = paste_back(img, edited, box, small, feather_px=0)
    assert out_f.shape == (1, 300, 220, 3) and out_f.dtype == np.float32
    keep = np.ones(region.shape, bool)
    keep[y + 32:y + 96, x + 32:x + 96] = False
    assert np.array_equal(out_f[0][keep], img[0].numpy()[keep])
    with pytest.raises(CollabError, match="edit region is 10×10"):
        paste_back(original, edited, box, np.ones((10, 10), bool))


def test_paint_region_chains():
    s = face_sample(1, size=64)
    labels = s.labels.copy()
    hat = np.zeros((64, 64), bool)
    hat[2:12, 16:48] = True
    out = paint_region(labels, hat, "hat")
    assert np.array_equal(labels, s.labels)  # the input is not changed
    assert (out[hat] == C["hat"]).all() and np.array_equal(out[~hat], labels[~hat])
    lip = np.zeros((64, 64), bool)
    lip[40:42, 28:36] = True
    out2 = paint_region(paint_region(out, lip, "upper lip"), hat[:, ::-1] & False, "hair")
    assert (out2[lip] == C["u_lip"]).all() and (out2[hat & ~lip] == C["hat"]).all()
    grown = paint_region(labels, lip, "mouth", grow=2)
    assert (grown == C["mouth"]).sum() > (paint_region(labels, lip, "mouth") == C["mouth"]).sum()
    smooth = paint_region(labels, hat, "hat", feather=2)
    assert 0 < (smooth == C["hat"]).sum() <= (out == C["hat"]).sum() + 1
    with pytest.raises(InputError, match="background, skin, nose, eye_g.*cloth"):
        paint_region(labels, hat, "beard")
    with pytest.raises(CollabError, match="painted mask is 32×32 but the label map 64×64"):
        paint_region(labels, np.zeros((32, 32), bool), "hat")
    with pytest.raises(InputError, match="grow"):
        paint_region(labels, hat, "hat", grow=-1)
