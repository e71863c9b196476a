import numpy as np
import pytest
import torch
from PIL import Image

from collab_core.errors import ConditioningError
from collab_core.masks import (
    CLASS_COLORS,
    CLASS_NAMES,
    celebamask_palette,
    colorize_labels,
    describe_labels,
    labels_from_colors,
    labels_to_onehot,
    labels_to_palette_image,
    load_mask,
)


def _synthetic_labels(h=48, w=40):
    """Every class present, in bands, so that a wrong colour or index mapping shows up."""
    lab = (np.arange(h)[:, None] // 3 + np.arange(w)[None, :] // 7) % 19
    lab[0, :19] = np.arange(19)
    return lab.astype(np.int64)


def _palette_png(lab):
    img = Image.fromarray(lab.astype(np.uint8)).convert("P")
    img.putpalette(celebamask_palette())
    return img


def test_class_table():
    assert len(CLASS_NAMES) == 19 and len(CLASS_COLORS) == 19
    assert CLASS_NAMES[0] == "background" and CLASS_NAMES[13] == "hair" and CLASS_NAMES[18] == "cloth"
    assert CLASS_COLORS[1] == (204, 0, 0) and CLASS_COLORS[13] == (0, 0, 204) and CLASS_COLORS[17] == (255, 153, 51)
    assert len(set(CLASS_COLORS)) == 19


def test_all_input_forms_give_the_same_labels(tmp_path):
    lab = _synthetic_labels()
    rgb = colorize_labels(lab)
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 40, 3)
    assert tuple(rgb[0, 13]) == CLASS_COLORS[13]

    paths = {}
    for name, img in {
        "palette": _palette_png(lab),
        "grey": Image.fromarray(lab.astype(np.uint8)),
        "rgb": Image.fromarray(rgb),
        "rgba": Image.fromarray(np.dstack([rgb, np.full(lab.shape, 255, np.uint8)])),
    }.items():
        paths[name] = tmp_path / f"{name}.png"
        img.save(paths[name])
    assert Image.open(paths["palette"]).mode == "P" and Image.open(paths["grey"]).mode == "L"

    comfy = torch.from_numpy(rgb).float().div(255)[None]  # ComfyUI IMAGE [1, H, W, 3] in [0, 1]
    forms = {
        **{f"{k} path": str(p) for k, p in paths.items()},
        "palette pil": Image.open(paths["palette"]),
        "numpy int": lab,
        "numpy uint8": lab.astype(np.uint8),
        "tensor long": torch.from_numpy(lab),
        "tensor [1,H,W]": torch.from_numpy(lab)[None],
        "float integral": lab.astype(np.float32),
        "comfy image": comfy,
        "comfy image [H,W,3]": comfy[0],
        "comfy image half": comfy.half(),
        "comfy mask of grey png": torch.from_numpy(lab).float()[None] / 255,
        "grey png via rgb": np.repeat(lab.astype(np.uint8)[..., None], 3, axis=2),
        "uint8 rgb": rgb,
    }
    for name, src in forms.items():
        got = load_mask(src)
        assert got.dtype == np.int64 and got.shape == lab.shape, name
        assert np.array_equal(got, lab), name


def test_onehot_layout_and_reference_resize():
    lab = _synthetic_labels(100, 70)  # not a multiple of 32, so the NEAREST sample grid matters
    oh = labels_to_onehot(lab)
    assert oh.dtype == torch.long and oh.shape == (1, 19, 1024)
    assert oh.sum(1).eq(1).all()
    # The reference's exact call: the P image resized by PIL, getdata() row-major.
    ref = np.asarray(_palette_png(lab).resize((32, 32), Image.NEAREST)).reshape(-1)
    assert np.array_equal(oh[0].argmax(0).numpy(), ref)
    assert labels_to_onehot(lab, size=16).shape == (1, 19, 256)


def test_palette_image_helper_round_trips():
    lab = _synthetic_labels()
    img = labels_to_palette_image(lab)
    assert img.mode == "P" and img.getpalette()[:57] == [c for rgb in CLASS_COLORS for c in rgb]
    assert np.array_equal(load_mask(img), lab)


def test_describe_labels():
    lab = np.zeros((10, 10), np.int64)
    lab[:5] = 13
    lab[5, :2] = 1
    d = describe_labels(lab)
    assert d == {"background": 48.0, "skin": 2.0, "hair": 50.0}


def test_unknown_colour_message():
    rgb = colorize_labels(_synthetic_labels())
    rgb[5:7, 3:8] = (200, 3, 3)  # 10 px near skin
    rgb[20, 30] = (12, 250, 9)
    with pytest.raises(ConditioningError) as exc:
        load_mask(rgb)
    msg = str(exc.value)
    assert "11 of 1920 mask pixels (2 distinct colours)" in msg
    assert "rgb(200, 3, 3): 10 px, e.g. at (x=3, y=5)" in msg
    assert "nearest class 1 'skin' rgb(204, 0, 0)" in msg
    assert "tolerance" in msg


def test_tolerance_snaps_lossy_colours():
    lab = _synthetic_labels()
    rng = np.random.default_rng(0)
    noisy = np.clip(colorize_labels(lab).astype(int) + rng.integers(-4, 5, (48, 40, 3)), 0, 255).astype(np.uint8)
    with pytest.raises(ConditioningError):
        load_mask(noisy)
    assert np.array_equal(load_mask(noisy, tolerance=10), lab)
    assert np.array_equal(labels_from_colors(noisy, tolerance=10), lab)
    with pytest.raises(ConditioningError, match="within tolerance=1"):
        load_mask(noisy, tolerance=1)


@pytest.mark.parametrize("value", [19, -1, 255])
def test_out_of_range_labels(value):
    lab = _synthetic_labels()
    lab[3, 4] = value
    with pytest.raises(ConditioningError, match=rf"found {value} \(1 px\)"):
        load_mask(lab)


def test_out_of_range_palette_index():
    lab = _synthetic_labels().astype(np.uint8)
    lab[0, 0] = 25
    with pytest.raises(ConditioningError, match="palette index.*25"):
        load_mask(_palette_png(lab))


@pytest.mark.parametrize(
    "shape", [(1024,), (1, 19, 32, 32), (2, 8, 8, 3), (1, 1, 8, 8, 3), (3, 8, 8), (8, 8, 2)]
)
def test_wrong_dims(shape):
    with pytest.raises(ConditioningError, match="got"):
        load_mask(np.zeros(shape, np.int64))


def test_other_bad_inputs(tmp_path):
    with pytest.raises(ConditioningError, match="non-integer"):
        load_mask(np.full((4, 4), 2.5))
    with pytest.raises(ConditioningError, match="not found"):
        load_mask(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ConditioningError, match="cannot read"):
        load_mask(tmp_path / "junk.png")
    with pytest.raises(ConditioningError, match="0..255"):
        load_mask(np.full((4, 4, 3), 300.0))
    with pytest.raises(ConditioningError):
        load_mask([[0, 1], [1, 0]])


def test_foreign_palette_warns_and_uses_indices():
    lab = _synthetic_labels()
    img = Image.fromarray(lab.astype(np.uint8)).convert("P")
    img.putpalette([v for i in range(256) for v in (i, i, i)])
    with pytest.warns(UserWarning, match="palette differs"):
        got = load_mask(img)
    assert np.array_equal(got, lab)


@pytest.mark.parity
def test_fixture_label_map_to_onehot(ref):
    labels = ref.mask_labels
    side = labels.shape[-1]
    assert torch.equal(labels_to_onehot(labels, size=side), ref.inputs["mask_onehot"])


@pytest.mark.parity
def test_fixture_512_palette_png_resizes_back(ref, tmp_path):
    labels = ref.mask_labels.numpy()
    side = labels.shape[-1]
    big = np.kron(labels, np.ones((512 // side, 512 // side), np.int64))  # the reference's 512 px test masks
    path = tmp_path / "mask512.png"
    _palette_png(big).save(path)
    assert Image.open(path).mode == "P"
    oh = labels_to_onehot(path, size=side)
    assert np.array_equal(oh[0].argmax(0).reshape(side, side).numpy(), labels)
    assert np.array_equal(labels_to_onehot(colorize_labels(big), size=side).numpy(), oh.numpy())
