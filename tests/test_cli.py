"""The command line end to end on the fixture checkpoints, and its error messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from collab_core.cli import main
from collab_core.masks import CLASS_COLORS
from reference_set import reference_set

PROJECT = Path(__file__).resolve().parent.parent


def palette_png(labels: torch.Tensor, path: Path) -> Path:
    """Write a label map as an indexed PNG with the CelebAMask-HQ palette, like the reference's test_data."""
    img = Image.fromarray(labels.numpy().astype(np.uint8), mode="P")
    img.putpalette([c for rgb in CLASS_COLORS for c in rgb] + [0] * (3 * (256 - len(CLASS_COLORS))))
    img.save(path)
    return path


@pytest.fixture(scope="module")
def fixture_inputs(ref_dir, tmp_path_factory):
    ref = reference_set(ref_dir)
    mask = palette_png(ref.mask_labels, tmp_path_factory.mktemp("mask") / "mask.png")
    return ref.manifest, mask


def weights_file(ref_dir, kind, suffix):
    """A fixture checkpoint named by the manifest (``kind`` in vae/text/mask/codiff), in the ``suffix`` form where
    the set has it (tests/reference_set.py)."""
    return reference_set(ref_dir).checkpoint(kind, suffix)


def golden(ref_dir, kind, eta=None):
    """The first run of ``kind`` (with ``eta`` if given) and its tensors; skips when the set has none."""
    ref = reference_set(ref_dir)
    runs = [r for r in ref.runs_or_skip(kind) if eta is None or r["eta"] == eta]
    if not runs:
        pytest.skip(f"the golden set {ref_dir} has no {kind} run with eta {eta}")
    return runs[0], ref.golden(runs[0])


@pytest.mark.parity
@pytest.mark.parametrize("mode,kind", [("collaborative", "codiff"), ("text", "text"), ("mask", "mask")])
def test_generate_reproduces_reference_pictures(ref_dir, fixture_inputs, tmp_path, mode, kind, capsys):
    manifest, mask = fixture_inputs
    run, g = golden(ref_dir, kind, 1.0)
    out = tmp_path / "out"
    code = main(["generate", "--checkpoints", str(ref_dir / "pretrained"), "--mask", str(mask),
                 "--text", manifest["inputs"]["text"], "--mode", mode, "--steps", str(run["steps"]),
                 "--eta", "1", "--seed", str(run["seed"]), "--batch", str(run["batch"]), "--out", str(out),
                 "--save-influence", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    want = g["x_0_uint8"].numpy().astype(int)
    for idx in range(run["batch"]):
        got = np.asarray(Image.open(out / f"{idx:06d}_x_0.png")).astype(int)
        assert got.shape == want[idx].shape
        # uint8 truncation may flip a value on an integer boundary by one level
        assert np.abs(got - want[idx]).max() <= 1
    influence = sorted(p.name for p in out.glob("*_influence.png"))
    if mode == "collaborative":
        assert influence == [f"{i:06d}_{n}_influence.png" for i in range(run["batch"]) for n in ("mask", "text")]
        grid = np.asarray(Image.open(out / "000000_mask_influence.png"))
        assert grid.ndim == 3 and grid.max() > 0
    else:
        assert influence == []
    settings = json.loads((out / "settings.json").read_text())
    assert settings["seed"] == run["seed"] and settings["steps"] == run["steps"]


def test_no_checkpoints_gives_one_clear_message(tmp_path, capsys, monkeypatch):
    # without the bundled demo models (tests/test_demo.py covers the fallback to them)
    monkeypatch.setattr("collab_core.models.DEMO_DIR", tmp_path / "no-demo")
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "--text", "a woman"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no checkpoints found" in err and "_codiff_mask_text" in err and "512_text.ckpt" in err
    assert "github.com/ziqihuangg/Collaborative-Diffusion" in err and "S-Lab" in err
    assert "Traceback" not in err


def test_missing_file_and_wrong_kind(ref_dir, tmp_path, capsys):
    code = main(["generate", "--text-model", str(tmp_path / "nope.ckpt"), "--text", "x"])
    assert code == 2 and "nope.ckpt" in capsys.readouterr().err
    # A VAE passed as the text model is refused with what it holds.
    code = main(["generate", "--text-model", str(weights_file(ref_dir, "vae", ".safetensors")), "--text", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "text" in err and "vae" in err.lower()


def test_out_must_be_a_folder_not_a_picture(tmp_path, capsys):
    code = main(["generate", "--out", str(tmp_path / "face.png"), "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "folder" in err and "face" in err and "Traceback" not in err
    assert not (tmp_path / "face.png").exists()


def test_negative_x0_threshold_is_refused(tmp_path, capsys):
    code = main(["generate", "--out", str(tmp_path / "o"), "--x0-threshold", "-1", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--x0-threshold" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_mode_needs_its_condition(ref_dir, capsys):
    code = main(["generate", "--checkpoints", str(ref_dir / "pretrained"), "--mode", "mask", "--steps", "10"])
    err = capsys.readouterr().err
    assert code == 2 and "--mask" in err


@pytest.mark.parity
def test_convert_writes_parts_that_load_again(ref_dir, fixture_inputs, tmp_path, capsys):
    manifest, mask = fixture_inputs
    parts = tmp_path / "parts"
    codiff = weights_file(ref_dir, "codiff", ".ckpt")
    assert main(["convert", str(codiff), str(parts)]) == 0
    written = sorted(p.name for p in parts.glob("*.safetensors"))
    assert {"mask_unet.safetensors", "text_unet.safetensors", "mask_diffuser.safetensors",
            "text_diffuser.safetensors", "vae.safetensors"} <= set(written)
    # The parts generate the same pictures as the original file (heads from the official YAML).
    run, g = golden(ref_dir, "codiff")  # every setting of the run from the manifest
    out = tmp_path / "out"
    code = main(["generate", "--checkpoints", str(parts), "--config", str(reference_set(ref_dir).config_path("codiff")),
                 "--mask", str(mask), "--text", run["text"], "--steps", str(run["steps"]), "--eta", str(run["eta"]),
                 "--seed", str(run["seed"]), "--batch", str(run["batch"]), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    want = g["x_0_uint8"].numpy().astype(int)
    for idx in range(run["batch"]):
        got = np.asarray(Image.open(out / f"{idx:06d}_x_0.png")).astype(int)
        # uint8 truncation may flip a value on an integer boundary by one level (x_0 agrees to 2e-6, see
        # test_pipeline_parity.py), never more
        assert np.abs(got - want[idx]).max() <= 1


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "collab_core", "--help"], cwd=PROJECT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "generate" in proc.stdout and "convert" in proc.stdout


@pytest.mark.parity
def test_convert_keeps_the_schedule_buffers(ref_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from collab_core.checkpoint import read_state_dict

    codiff = weights_file(ref_dir, "codiff", ".ckpt")
    source = read_state_dict(codiff)
    stored = {k for k in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance") if k in source}
    assert "alphas_cumprod" in stored
    assert main(["convert", str(codiff), str(tmp_path / "parts")]) == 0
    schedule = load_file(tmp_path / "parts" / "noise_schedule.safetensors")
    assert stored <= set(schedule) and all(torch.equal(schedule[k], source[k]) for k in stored)


@pytest.mark.parity
def test_convert_writes_files_with_the_users_umask(ref_dir, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert main(["convert", str(weights_file(ref_dir, "vae", ".safetensors")), str(tmp_path / "parts")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "parts").iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes  # not mkstemp's 0600


def test_fusion_reference_with_the_demo_gives_the_reference_fusion(tmp_path, monkeypatch, capsys):
    from collab_core.models import demo_bundle_dir, demo_defaults

    if demo_bundle_dir() is None:
        pytest.skip("demo bundle not built")
    assert demo_defaults()["influence"] == "plain softmax"  # the bundle's own setting differs
    monkeypatch.chdir(tmp_path)
    runs = {}
    for name, extra in (("own", []), ("reference", ["--fusion", "reference"])):
        out = tmp_path / name
        assert main(["generate", "--steps", "2", "--seed", "0", "--device", "cpu", "--out", str(out)] + extra) == 0
        runs[name] = json.loads((out / "settings.json").read_text())["influence"]
    assert runs["own"] == "plain-softmax"
    assert runs["reference"] == {"fusion": "reference", "mask_schedule": "cosine_decay", "mask_scale": 2.0}
