"""Editing inputs and metrics: photos, masks, sizes, regions, PSNR/SSIM/agreement — and their error messages."""

import numpy as np
import pytest
import torch
from PIL import Image

from collab_core.editing.inputs import edit_region, load_image, load_region
from collab_core.editing.inputs import changed_labels, check_sizes, load_labels
from collab_core.editing.metrics import colour_agreement, edit_report, label_agreement, psnr, ssim
from collab_core.errors import ConditioningError
from collab_core.masks import colorize_labels

from test_editing_fixtures import HAIR, edited_labels, synthetic_photo


def labels_32():
    lab = np.zeros((32, 32), np.int64)
    lab[8:24, 8:24] = 1
    lab[4:10, 6:26] = HAIR
    return lab


# ------------------------------------------------------------------------------------------------ photo


def test_rgb_photo_reads_like_the_reference(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "p.png")
    x = load_image(tmp_path / "p.png")
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, 2.0 * torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255.0) - 1.0)
    # The same picture as a ComfyUI IMAGE, as PIL, and as what load_image returns.
    assert torch.allclose(load_image(torch.from_numpy(rgb)[None].float() / 255), x, atol=1e-6)
    assert torch.equal(load_image(Image.fromarray(rgb)), x)
    assert torch.equal(load_image(x), x)


@pytest.mark.parametrize("mode,needle", [("L", "grey"), ("P", "palette"), ("CMYK", "CMYK"), ("I;16", "16-bit")])
def test_non_rgb_photo_is_refused_with_the_fix(tmp_path, mode, needle):
    Image.new(mode, (32, 32)).save(tmp_path / ("p.tiff" if mode in ("CMYK", "I;16") else "p.png"))
    path = next(tmp_path.iterdir())
    with pytest.raises(ConditioningError) as err:
        load_image(path)
    msg = str(err.value)
    assert "not RGB" in msg and repr(mode) in msg and needle in msg and "convert('RGB')" in msg
    assert str(path) in msg


def test_transparent_photo_and_bad_arrays_are_refused():
    rgba = np.full((8, 8, 4), 255, np.uint8)
    assert load_image(Image.fromarray(rgba, "RGBA")).shape == (1, 3, 8, 8)  # opaque RGBA is fine
    rgba[0, 0, 3] = 0
    with pytest.raises(ConditioningError, match="transparent"):
        load_image(Image.fromarray(rgba, "RGBA"))
    with pytest.raises(ConditioningError, match="channels first"):
        load_image(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ConditioningError, match=r"must lie in \[0, 1\]"):
        load_image(np.full((8, 8, 3), 2.0, np.float32))
    with pytest.raises(ConditioningError, match="batch of 2"):
        load_image(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ConditioningError, match="not found"):
        load_image("/nonexistent/photo.png")


# ------------------------------------------------------------------------------------------------ masks


def test_image_and_mask_of_different_sizes_are_refused():
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ConditioningError) as err:
        check_sizes(image, {"target mask": np.zeros((64, 64), np.int64)})
    msg = str(err.value)
    assert "image 32×32" in msg and "target mask 64×64" in msg and "NEAREST" in msg
    with pytest.raises(ConditioningError, match="source mask 16×16"):
        changed_labels(np.zeros((16, 16)), np.zeros((32, 32)))
    check_sizes(image, {"target mask": np.zeros((32, 32)), "source mask": None})  # same size: fine


def test_unknown_mask_colours_name_the_mask_and_the_pixels():
    rgb = colorize_labels(labels_32())
    rgb[3, 5] = (10, 20, 30)
    with pytest.raises(ConditioningError) as err:
        load_labels(rgb, "target mask (--mask)")
    msg = str(err.value)
    assert msg.startswith("target mask (--mask):") and "rgb(10, 20, 30)" in msg and "x=5, y=3" in msg
    assert "not CelebAMask-HQ class colours" in msg
    rgb[3, 5] = (204, 1, 0)  # a lossy class colour snaps with a tolerance
    assert load_labels(rgb, "target mask", tolerance=5)[3, 5] == 1


def test_edit_region_pools_grows_and_feathers():
    changed = np.zeros((32, 32), bool)
    changed[9, 9] = True  # one picture pixel
    r = edit_region(changed, (16, 16), grow=0)
    assert r.shape == (1, 1, 16, 16) and r.sum() == 1 and r[0, 0, 4, 4] == 1  # its latent pixel
    g = edit_region(changed, (16, 16), grow=1)
    assert g.sum() == 9 and g[0, 0, 3:6, 3:6].eq(1).all()
    f = edit_region(changed, (16, 16), grow=0, feather=1.0)
    assert f[0, 0, 4, 4] == 1 and 0 < f[0, 0, 4, 5] < 1 and f[0, 0, 0, 15] < 1e-3  # soft falloff outside only
    assert load_region(np.eye(4)[None]).dtype == bool


# ------------------------------------------------------------------------------------------------ metrics


def test_psnr_and_ssim_known_values_and_weights():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a.copy()
    assert psnr(a, b) == float("inf") and ssim(a, b) == pytest.approx(1.0)
    b[:8] += 10  # MSE 100 on the top half
    assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / 50))
    bottom = np.zeros((16, 16))
    bottom[8:] = 1
    assert psnr(a, b, bottom) == float("inf")
    assert psnr(a, b, 1 - bottom) == pytest.approx(10 * np.log10(255 ** 2 / 100))
    noisy = np.clip(a + np.random.default_rng(0).normal(0, 30, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, noisy) < 0.5


def test_agreement_scores():
    lab = labels_32()
    tgt = edited_labels(lab)
    photo = synthetic_photo(lab)
    perfect = photo.copy()
    perfect[tgt != lab] = synthetic_photo(tgt)[tgt != lab]  # the hair pixels painted like the background
    c = colour_agreement(photo, perfect, lab, tgt)
    assert c["baseline"] == 0.0 and c["agreement"] > 0.95 and c["coverage"] == 1.0
    a = label_agreement(tgt, tgt, tgt != lab)
    assert a["pixel_accuracy"] == 1.0 and a["mean_iou"] == 1.0
    assert label_agreement(lab, tgt, tgt != lab)["pixel_accuracy"] == 0.0
    rep = edit_report(photo, perfect, (tgt != lab).astype(float), lab, tgt)
    assert rep["psnr_outside"] == float("inf") and rep["colour_agreement"]["agreement"] > 0.95
    assert rep["region_fraction"] == pytest.approx((tgt != lab).mean())
