"""Editing a photo of any size (collab_core.editing.photo and `edit --paint/--crop`), on the demo models.

The photo is a held-out synthetic face cut to 200×260 with the face off-centre (the demo parser's test split), so
the whole path runs: parse → paint a class → crop the face → edit at the model's 64 px → paste back at 200×260.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from collab_core.cli import main
from collab_core.editing.crop import region_in_photo
from collab_core.editing.photo import edit_photo, prepare_photo
from collab_core.errors import CollabError, ConditioningError, InputError
from collab_core.face_parsing import FaceParser, NoFaceError, demo_parser_dir
from collab_core.masks import CLASS_NAMES
from collab_core.training.parser import heldout_picture

HAIR = CLASS_NAMES.index("hair")
SKIN = CLASS_NAMES.index("skin")


def fringe_strokes(labels: np.ndarray, rows: int = 12) -> np.ndarray:
    """White strokes over the top ``rows`` rows of the skin: a fringe to paint as hair."""
    ys, xs = np.nonzero(labels == SKIN)
    strokes = np.zeros(labels.shape, np.uint8)
    strokes[ys.min():ys.min() + rows, xs.min():xs.max()] = 255
    return strokes


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    img, lab = heldout_picture(3, seed=0, width=200, height=260)
    d = tmp_path_factory.mktemp("photo")
    Image.fromarray(img).save(d / "photo.png")
    Image.fromarray(fringe_strokes(lab)).save(d / "strokes.png")
    return d, img, lab


@pytest.fixture(scope="module")
def parser():
    folder = demo_parser_dir()
    if folder is None:
        pytest.skip("the bundled demo face parser (collab_core/demo/face_parser) is missing")
    return FaceParser.from_folder(folder)


@pytest.fixture(scope="module")
def demo_pipe():
    from collab_core.models import demo_bundle_dir, load_pipeline

    if demo_bundle_dir() is None:
        pytest.skip("the demo bundle (collab_core/demo) is missing")
    return load_pipeline(demo_bundle_dir())


def test_prepare_parses_paints_and_crops(photo, parser):
    d, img, lab = photo
    plan = prepare_photo(d / "photo.png", 64, paint=[("hair", d / "strokes.png")], parser=parser)
    assert plan.parsed and plan.box is not None
    x, y, w, h = plan.box
    assert w == h and 0 <= x and x + w <= 200 and 0 <= y and y + h <= 260
    assert plan.crop.shape == (64, 64, 3) and plan.crop_source.shape == (64, 64)
    strokes = np.asarray(Image.open(d / "strokes.png")) > 127
    assert (plan.target_labels[strokes] == HAIR).all()
    assert (plan.target_labels[~strokes] == plan.source_labels[~strokes]).all()
    assert plan.changed.sum() > 0


def test_crop_none_edits_the_photo_as_it_is(photo):
    d, img, lab = photo
    target = lab.copy()
    target[fringe_strokes(lab) > 0] = HAIR
    plan = prepare_photo(img, 64, source_mask=lab, target_mask=target, crop="none")
    assert plan.box is None and plan.crop.shape == img.shape and (plan.crop == img).all()
    assert (plan.crop_target == target).all() and plan.crop_changed.sum() == plan.changed.sum() > 0


def test_prepare_errors_before_any_work(photo, parser, tmp_path):
    d, img, lab = photo
    with pytest.raises(InputError, match="not one of the 19 face classes"):
        prepare_photo(img, 64, paint=[("mustache", d / "strokes.png")], parser=parser)
    with pytest.raises(ConditioningError, match="painted region for 'hair' is 100×100"):
        prepare_photo(img, 64, paint=[("hair", np.ones((100, 100), bool))], parser=parser)
    with pytest.raises(InputError, match="reaches past the 200×260 picture"):
        prepare_photo(img, 64, source_mask=lab, target_mask=lab, crop="150,150,100,100")
    with pytest.raises(ConditioningError, match="neither a source mask nor a face parser"):
        prepare_photo(img, 64, paint=[("hair", d / "strokes.png")])
    with pytest.raises(NoFaceError, match="no face found"):
        prepare_photo(np.zeros((260, 200, 3), np.uint8), 64, source_mask=np.zeros((260, 200), np.int64),
                      paint=[("hair", d / "strokes.png")])
    with pytest.raises(ConditioningError, match="target mask is 64×64 but the photo 200×260"):
        prepare_photo(img, 64, source_mask=lab, target_mask=np.zeros((64, 64), np.int64))


def test_api_edit_keeps_every_pixel_outside_the_region(photo, parser, demo_pipe):
    d, img, lab = photo
    result = edit_photo(demo_pipe, img, paint=[("hair", d / "strokes.png")], parser=parser, steps=8, seed=0)
    assert result.image.shape == img.shape and result.image.dtype == np.uint8
    allowed = result.region_in_photo()
    assert allowed.any() and not allowed.all()
    assert (result.image[~allowed] == img[~allowed]).all()  # bit for bit outside the edited region
    assert (result.image[allowed] != img[allowed]).any()  # and something changed inside
    assert result.changed_outside() == 0


def test_api_edit_with_a_given_mask_and_box(photo, demo_pipe):
    d, img, lab = photo
    target = lab.copy()
    target[fringe_strokes(lab) > 0] = HAIR
    result = edit_photo(demo_pipe, img, source_mask=lab, target_mask=target, crop="20,40,150,150", steps=10)
    assert result.plan.box == (20, 40, 150, 150) and not result.plan.parsed
    outside_box = np.ones(lab.shape, bool)
    outside_box[40:190, 20:170] = False
    assert (result.image[outside_box] == img[outside_box]).all()
    assert (result.image[~result.region_in_photo()] == img[~result.region_in_photo()]).all()


def test_region_in_photo_places_the_crop_region():
    reg = np.zeros((4, 4), bool)
    reg[1:3, 1:3] = True
    out = region_in_photo(reg, (10, 20, 8, 8), (40, 30), (4, 4))
    assert out.shape == (40, 30) and out.sum() == 16 and out[22:26, 12:16].all()


def test_cli_edit_paint_on_a_photo_of_another_size(photo, tmp_path, capsys):
    d, img, lab = photo
    out = tmp_path / "out"
    code = main(["edit", "--image", str(d / "photo.png"), "--paint", f"hair={d / 'strokes.png'}", "--steps", "8",
                 "--inside", "noise", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    edited = np.asarray(Image.open(out / "edited_photo.png").convert("RGB"))
    assert edited.shape == img.shape
    metrics = json.loads((out / "metrics.json").read_text())
    settings = json.loads((out / "settings.json").read_text())
    assert settings["source_mask_parsed"] and settings["painted"] == ["hair"] and settings["crop_box"]
    assert metrics["photo_changed_outside_region_pixels"] == 0
    # Independently of the metric: outside the crop box the photo is untouched.
    x, y, w, h = settings["crop_box"]
    outside = np.ones(lab.shape, bool)
    outside[y:y + h, x:x + w] = False
    assert (edited[outside] == img[outside]).all()
    # Inside, the painted pixels move toward the hair colour (agreement well above the unedited photo's).
    agree = metrics["colour_agreement"]
    assert agree["agreement"] > agree["baseline"] + 0.3
    for name in ("source_mask_parsed.png", "target_mask_painted.png", "edit_region.png"):
        assert (out / name).is_file()


@pytest.mark.parametrize("args, message", [
    (["--paint", "moustache=X"], "not one of the 19 face classes"),
    (["--paint", "hair"], "write CLASS=REGION.png"),
    (["--paint", "hair=missing.png"], "does not exist"),
    (["--crop", "left"], "give auto"),
    (["--crop", "150,150,100,100", "--paint", "hair=S"], "reaches past the 200×260 picture"),
])
def test_cli_edit_photo_errors_write_nothing(photo, tmp_path, capsys, args, message):
    d, img, lab = photo
    args = [a.replace("=X", f"={d / 'strokes.png'}").replace("=S", f"={d / 'strokes.png'}") for a in args]
    out = tmp_path / "out"
    code = main(["edit", "--image", str(d / "photo.png"), "--steps", "2", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_api_imagic_edit_of_a_photo_of_another_size(photo, parser, demo_pipe, tmp_path):
    from collab_core.editing.imagic import ImagicConfig

    d, img, lab = photo
    cfg = ImagicConfig(stage1_iters=2, stage2_iters=2, checkpoint_every=0)
    result = edit_photo(demo_pipe, img, paint=[("hair", d / "strokes.png")], parser=parser, method="imagic",
                        imagic={"config": cfg, "steps": 4, "work_dir": tmp_path / "work"})
    assert result.image.shape == img.shape
    allowed = result.region_in_photo()
    assert allowed.any() and (result.image[~allowed] == img[~allowed]).all()
    assert (tmp_path / "work" / "mask_edit").is_dir()
