"""``python -m collab_core edit`` end to end on the fixture checkpoints, and its error messages."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from collab_core.cli import main

from test_editing_fixtures import fixture_labels, write_inputs


@pytest.fixture(scope="module")
def inputs(ref_dir, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield write_inputs(tmp_path_factory.mktemp("edit_inputs"), fixture_labels(ref_dir))
    torch.set_num_threads(threads)


def run(ref_dir, *args):
    return main(["edit", "--checkpoints", str(ref_dir / "pretrained"), "--device", "cpu", *map(str, args)])


def test_edit_by_inversion_writes_result_region_influence_and_metrics(ref_dir, inputs, tmp_path, capsys):
    photo, src, tgt = inputs
    out = tmp_path / "inv"
    code = run(ref_dir, "--image", photo, "--mask", tgt, "--source-mask", src, "--text", "She has no hair.",
               "--method", "inversion", "--steps", 5, "--refine", 1, "--reconstruct", "--paste-back", "--out", out)
    assert code == 0, capsys.readouterr().err
    for f in ("000000_x_0.png", "000000_x_0_pasted.png", "000000_mask_influence.png", "000000_text_influence.png",
              "edit_region.png", "input_image_reconstructed.png", "inversion_reconstruction.png", "inverted_x_T.pt",
              "metrics.json", "settings.json"):
        assert (out / f).is_file(), f
    settings = json.loads((out / "settings.json").read_text())
    assert settings["reconstruction_max_abs_error"] == 0.0 and settings["eta"] == 0.0 and settings["preserve"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"psnr_outside", "ssim_outside", "psnr_outside_vs_vae", "colour_agreement"} <= set(metrics)
    assert 0 < metrics["region_fraction"] < 1
    # Pasted back over the photo outside the region: pixel-exact there.
    region = np.asarray(Image.open(out / "edit_region.png")) == 0
    assert (np.asarray(Image.open(out / "000000_x_0_pasted.png"))[region] == np.asarray(Image.open(photo))[region]).all()


def test_imagic_writes_the_reference_artefacts(ref_dir, inputs, tmp_path, capsys):
    photo, src, tgt = inputs
    out = tmp_path / "imagic"
    code = run(ref_dir, "--image", photo, "--mask", tgt, "--source-mask", src, "--text", "She has no hair.",
               "--method", "imagic", "--steps", 5, "--stage1-iters", 3, "--stage2-iters", 2, "--alpha", "text=0.9",
               "--alpha-list", "0,1", "--collab-alpha-list", "1.5", "--out", out)
    assert code == 0, capsys.readouterr().err
    for branch in ("text", "mask"):
        d = out / f"{branch}_edit"
        for f in ("input_image_reconstructed.png", "emb_tgt.pt", "emb_opt.pt", "optDM_unet.safetensors",
                  "losses.json", "A_start_tgtText_origDM.png", "A_end_optText_origDM.png",
                  "0A_interText_origDM_1_alpha=1.0.png", "B_end_optText_optDM.png",
                  "0C_interText_optDM_0_alpha=0.0.png"):
            assert (d / f).is_file(), f"{branch}: {f}"
        assert torch.load(d / "emb_opt.pt", weights_only=True).shape[0] == 1
    assert (out / "collaborative_edit" / "seed=2" / "000000_x_0_0_alpha=1.5.png").is_file()
    for f in ("000000_x_0.png", "000000_mask_influence.png", "000000_text_influence.png", "metrics.json"):
        assert (out / f).is_file(), f
    settings = json.loads((out / "settings.json").read_text())
    assert settings["alpha"] == {"mask": 1.0, "text": 0.9} and settings["eta"] == 1.0
    assert settings["imagic"]["stage1_lr"] == 1e-3 and settings["imagic"]["stage2_lr"] == 1e-6  # reference defaults


def test_edit_errors_are_clear(ref_dir, inputs, tmp_path, capsys):
    photo, src, tgt = inputs
    small = tmp_path / "small.png"
    Image.open(tgt).resize((16, 16), Image.NEAREST).save(small)
    assert run(ref_dir, "--image", photo, "--mask", small, "--source-mask", src) == 2
    err = capsys.readouterr().err
    assert "target mask is 16×16 but the photo 32×32" in err and "photo's size" in err

    grey = tmp_path / "grey.png"
    Image.open(photo).convert("L").save(grey)
    assert run(ref_dir, "--image", grey, "--mask", tgt) == 2
    assert "not RGB (mode 'L'" in capsys.readouterr().err

    colours = tmp_path / "colours.png"
    rgb = np.asarray(Image.open(tgt).convert("RGB")).copy()
    rgb[2, 3] = (9, 9, 200)
    Image.fromarray(rgb).save(colours)
    assert run(ref_dir, "--image", photo, "--mask", colours, "--source-mask", src) == 2
    err = capsys.readouterr().err
    assert "target mask:" in err and "rgb(9, 9, 200)" in err and "x=3, y=2" in err

    assert run(ref_dir, "--image", photo, "--mask", src, "--source-mask", src, "--steps", 5) == 2
    assert "nothing to edit" in capsys.readouterr().err
    assert run(ref_dir, "--image", photo, "--mask", tgt, "--method", "imagic", "--strength", 0.5) == 2
    assert "--method inversion" in capsys.readouterr().err
    assert run(ref_dir, "--image", photo) == 2
    assert "nothing to edit toward" in capsys.readouterr().err
