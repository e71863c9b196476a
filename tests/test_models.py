"""Finding checkpoints by their official names, and loading sets whose parts do not fit together."""

import json
import shutil

import pytest
import torch

from collab_core.checkpoint import read_checkpoint_metadata, save_safetensors
from collab_core.errors import BranchMismatchError, CheckpointError
from collab_core.layout import split_checkpoint, write_parts
from collab_core.checkpoint import read_state_dict
from collab_core.models import find_checkpoints, load_pipeline, role_of
from collab_core.settings import find_config
from collab_core.text_encoder import TextEncoder


def test_roles_follow_official_names(tmp_path):
    assert role_of(tmp_path / "512_codiff_mask_text.ckpt") == "collaborative"  # ends in _text, but is not the text LDM
    assert role_of(tmp_path / "512_text.ckpt") == "text"
    assert role_of(tmp_path / "256_mask.safetensors") == "mask"
    assert role_of(tmp_path / "512_vae.pt") == "vae"
    assert role_of(tmp_path / "notes.txt") is None
    assert role_of(tmp_path / "text_unet.safetensors") == "part:text_unet"


def test_find_checkpoints_needs_prefix_for_two_sets(tmp_path):
    for name in ("512_text.ckpt", "256_text.ckpt", "512_vae.ckpt", "512_vae.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(CheckpointError, match="--prefix"):
        find_checkpoints(tmp_path)
    found = find_checkpoints(tmp_path, prefix="512")
    assert found["text"].name == "512_text.ckpt"
    assert found["vae"].name == "512_vae.safetensors"  # safetensors preferred over the pickle
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoints(tmp_path / "missing")


def _manifest_file(ref_dir, kind, suffix):
    """The set's ``kind`` checkpoint in the ``suffix`` form where it has one (a set may ship only ``.ckpt``)."""
    from reference_set import reference_set

    return reference_set(ref_dir).checkpoint(kind, suffix)


@pytest.fixture()
def parts_dir(ref_dir, tmp_path):
    codiff = _manifest_file(ref_dir, "codiff", ".safetensors")
    parts = split_checkpoint(read_state_dict(codiff), read_checkpoint_metadata(codiff))
    out = tmp_path / "parts"
    write_parts(parts, out, codiff.name)
    return out, find_config(codiff)


@pytest.mark.parity
def test_text_encoder_of_another_width_is_refused(parts_dir):
    out, config = parts_dir
    wide = TextEncoder(vocab_size=30522, max_length=77, dim=8, depth=1)
    meta = read_checkpoint_metadata(out / "text_text_encoder.safetensors")
    save_safetensors(wide.state_dict(), out / "text_text_encoder.safetensors", meta)
    with pytest.raises(BranchMismatchError, match="8-dim"):
        load_pipeline(out, configs=[config])


@pytest.mark.parity
def test_diffusers_without_their_branch_are_refused(parts_dir):
    out, config = parts_dir
    (out / "mask_unet.safetensors").unlink()
    with pytest.raises(BranchMismatchError, match="mask"):
        load_pipeline(out, configs=[config])


@pytest.mark.parity
def test_unet_without_encoder_is_refused(parts_dir):
    out, config = parts_dir
    (out / "mask_mask_encoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no condition encoder"):
        load_pipeline(out, configs=[config])


@pytest.mark.parity
def test_codiff_file_alone_is_enough_and_heads_come_from_config(ref_dir, tmp_path, caplog):
    codiff = _manifest_file(ref_dir, "codiff", ".safetensors")
    pipe = load_pipeline(diffuser=codiff)
    assert pipe.names == ["mask", "text"]
    assert all(b.diffuser is not None for b in pipe.branches) and pipe.vae is not None
    # Copied away from its configs, the file loads with the official head count (32), and says so: weights
    # cannot tell how many heads a model was trained with.
    lonely = tmp_path / codiff.name
    shutil.copy(codiff, lonely)
    with caplog.at_level("WARNING"):
        guessed = load_pipeline(diffuser=lonely)
    assert "official 32 heads" in caplog.text and "YAML" in caplog.text
    assert guessed.branches[0].unet.config.attention_head_dim == 32
    from reference_set import reference_set

    # diffusers calls the UNet's head count attention_head_dim; the set's own, as its YAML states it
    assert pipe.branches[0].unet.config.attention_head_dim == reference_set(ref_dir).unet_heads(pipe.names[0])


# ------------------------------------------------------------------------------------------------- which files


def _demo_present():
    from collab_core.models import demo_bundle_dir

    return demo_bundle_dir() is not None


@pytest.mark.parity
def test_default_folder_honours_every_argument(ref_dir, tmp_path, monkeypatch):
    """./pretrained is searched with the caller's prefix and use_diffusers (one path, no retry dropping them)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained").mkdir()
    src = _manifest_file(ref_dir, "codiff", ".safetensors")  # the set's own form (.ckpt where it has no twin)
    shutil.copy(src, tmp_path / "pretrained" / f"tiny_codiff_mask_text{src.suffix}")
    pipe = load_pipeline(prefix="tiny", use_diffusers=False)
    assert pipe.names == ["mask", "text"] and all(b.diffuser is None for b in pipe.branches)
    assert not getattr(pipe, "is_demo", False)


@pytest.mark.parity
def test_several_sets_in_a_default_folder_reach_the_user(ref_dir, tmp_path, monkeypatch):
    """A ./pretrained holding two sets is an error to fix with --prefix, not a reason to fall back to the demo."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained").mkdir()
    src = _manifest_file(ref_dir, "codiff", ".safetensors")
    for name in ("512_codiff_mask_text", "256_codiff_mask_text"):
        shutil.copy(src, tmp_path / "pretrained" / f"{name}{src.suffix}")
    with pytest.raises(CheckpointError, match="--prefix"):
        load_pipeline()
    assert load_pipeline(prefix="256").names == ["mask", "text"]


@pytest.mark.skipif(not _demo_present(), reason="demo bundle not built")
def test_demo_fallback_honours_use_diffusers_and_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./pretrained, no ./checkpoints
    pipe = load_pipeline(use_diffusers=False)
    assert pipe.is_demo and all(b.diffuser is None for b in pipe.branches)
    assert load_pipeline(prefix="demo").is_demo
    # a prefix the demo files do not have is not silently ignored
    with pytest.raises(CheckpointError, match="starting with 'nosuchset'"):
        load_pipeline(prefix="nosuchset")


def test_pipeline_never_imports_models():
    """Imports go one way: models builds pipelines; pipeline.py names no loader (no hidden cycle)."""
    import ast
    import collab_core.pipeline as pipeline

    tree = ast.parse(open(pipeline.__file__, encoding="utf-8").read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "models" not in imported and not any((m or "").endswith(".models") for m in imported)
