"""Reading weights files: fixture equality, and refusal of unsafe or broken files."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from collab_core.checkpoint import read_checkpoint_metadata, read_state_dict, save_safetensors
from collab_core.errors import CheckpointError


def _weights_entries(ref_dir: Path):
    manifest = json.loads((ref_dir / "manifest.json").read_text())
    return manifest["weights"]["checkpoints"]


@pytest.mark.parity
def test_fixture_ckpt_equals_safetensors(ref_dir):
    from reference_set import reference_set

    ref = reference_set(ref_dir)
    twins = ref.twins()
    if not twins:
        pytest.skip(f"the golden set {ref_dir} ships no .safetensors twins of its .ckpt files")
    for name, ckpt, st in twins:
        entry = ref.weights_entry(name)
        a = read_state_dict(ckpt)
        b = read_state_dict(st)
        assert a.keys() == b.keys(), name
        assert len(a) == entry["num_tensors"], name
        assert sum(t.numel() for t in a.values()) == entry["num_values"], name
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (name, k)
        assert read_checkpoint_metadata(ckpt) == {}


# ---------------------------------------------------------------------------------------------
# Lightning-like files
# ---------------------------------------------------------------------------------------------


def test_bare_state_dict_and_lightning_dict(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save(sd, tmp_path / "bare.pt")
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, tmp_path / "pl.ckpt")
    for name in ("bare.pt", "pl.ckpt"):
        got = read_state_dict(tmp_path / name)
        assert got.keys() == sd.keys()
        assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_parameters_become_plain_tensors(tmp_path):
    lin = torch.nn.Linear(2, 3)
    torch.save({"state_dict": {"w": lin.weight}}, tmp_path / "p.ckpt")
    got = read_state_dict(tmp_path / "p.ckpt")
    assert type(got["w"]) is torch.Tensor and not got["w"].requires_grad


def test_lightning_metadata_classes_are_stubbed(tmp_path, monkeypatch):
    """Callback classes, NumPy scalars and Namespaces are metadata: the state_dict still loads."""
    pl = types.ModuleType("pytorch_lightning")
    cb = types.ModuleType("pytorch_lightning.callbacks")
    mc = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = torch.tensor(0.5)
            self.dirpath = "logs/checkpoints"

    ModelCheckpoint.__module__ = mc.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mc.ModelCheckpoint = ModelCheckpoint
    pl.callbacks, cb.model_checkpoint = cb, mc
    for m in (pl, cb, mc):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    sd = {"model.diffusion_model.out.2.bias": torch.randn(3)}
    torch.save(
        {
            "state_dict": sd,
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}},
            "checkpoint_callback": ModelCheckpoint(),
            "hyper_parameters": {"lr": np.float64(1e-4), "args": argparse.Namespace(gpus="0,")},
            "arr": np.zeros(3),
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(10)}}}],
            "pytorch-lightning_version": "1.4.2",
        },
        tmp_path / "pl.ckpt",
    )
    for m in (pl, cb, mc):
        monkeypatch.delitem(sys.modules, m.__name__)
    got = read_state_dict(tmp_path / "pl.ckpt")
    assert list(got) == list(sd)
    assert torch.equal(got["model.diffusion_model.out.2.bias"], sd["model.diffusion_model.out.2.bias"])
    assert "pytorch_lightning" not in sys.modules  # nothing was imported to read it


class _RunsCode:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused(tmp_path, legacy):
    marker = tmp_path / "pwned_marker"
    payload = _RunsCode(os.system, f"touch {marker}")
    torch.save(
        {"state_dict": {"w": torch.ones(2)}, "callbacks": {"x": payload}},
        tmp_path / "evil.ckpt",
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "evil.ckpt")
    msg = str(info.value)
    assert "system" in msg and "not run" in msg and "safetensors" in msg
    assert not marker.exists()


@pytest.mark.parametrize("fn", [eval, exec, getattr, __import__], ids=lambda f: f.__name__)
def test_builtin_callables_are_refused(tmp_path, fn):
    arg = "__import__('os')" if fn is not getattr else "x"
    payload = _RunsCode(fn, arg)
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": payload}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=f"builtins.{fn.__name__}"):
        read_state_dict(tmp_path / "evil.pt")


def test_unknown_module_class_is_refused(tmp_path, monkeypatch):
    mod = types.ModuleType("some_training_script")

    class Thing:
        pass

    Thing.__module__ = mod.__name__
    Thing.__qualname__ = "Thing"
    mod.Thing = Thing
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    torch.save({"state_dict": {"w": torch.ones(1)}, "obj": Thing()}, tmp_path / "x.ckpt")
    monkeypatch.delitem(sys.modules, mod.__name__)
    with pytest.raises(CheckpointError, match="some_training_script.Thing"):
        read_state_dict(tmp_path / "x.ckpt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "ts.pt"))
    with pytest.raises(CheckpointError, match="TorchScript"):
        read_state_dict(tmp_path / "ts.pt")


# ---------------------------------------------------------------------------------------------
# Broken files
# ---------------------------------------------------------------------------------------------


def test_missing_path_names_it(tmp_path):
    p = tmp_path / "nope" / "512_codiff_mask_text.ckpt"
    with pytest.raises(CheckpointError, match="not found") as info:
        read_state_dict(p)
    assert str(p) in str(info.value)


def test_wrong_extension(tmp_path):
    p = tmp_path / "weights.txt"
    p.write_text("hello")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        read_state_dict(p)


def test_directory_is_refused(tmp_path):
    (tmp_path / "d.ckpt").mkdir()
    with pytest.raises(CheckpointError, match="directory"):
        read_state_dict(tmp_path / "d.ckpt")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file_is_reported_damaged(tmp_path, suffix):
    sd = {f"k{i}": torch.randn(64, 64) for i in range(4)}
    full = tmp_path / f"full{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": sd}, full)
    else:
        save_file(sd, str(full))
    data = full.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        bad = tmp_path / f"bad{suffix}"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="damaged"):
            read_state_dict(bad)


def test_web_page_and_empty_file(tmp_path):
    html = tmp_path / "512_text.ckpt"
    html.write_text("<!DOCTYPE html><html><body>Google Drive - virus scan warning</body></html>")
    with pytest.raises(CheckpointError, match="web page"):
        read_state_dict(html)
    empty = tmp_path / "e.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(empty)
    lfs = tmp_path / "l.ckpt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(CheckpointError, match="LFS"):
        read_state_dict(lfs)


def test_non_tensor_in_state_dict(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1), "step": 3}}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="'step'"):
        read_state_dict(tmp_path / "x.ckpt")


def test_empty_state_dict(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(tmp_path / "x.ckpt")
    save_file({}, str(tmp_path / "y.safetensors"))
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(tmp_path / "y.safetensors")


def test_dict_without_state_dict(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        read_state_dict(tmp_path / "x.pth")


# ---------------------------------------------------------------------------------------------
# Memory: optimizer state must stay on disk
# ---------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("with_numpy", [False, True], ids=["weights_only", "restricted"])
def test_optimizer_state_is_not_read(tmp_path, with_numpy):
    big = torch.ones(32 * 1024 * 1024)  # 128 MB of "AdamW moments"
    obj = {"state_dict": {"w": torch.ones(4)}, "optimizer_states": [{"state": {0: {"exp_avg": big}}}]}
    if with_numpy:  # forces the restricted-unpickler path
        obj["hyper_parameters"] = {"x": np.float32(1)}
    torch.save(obj, tmp_path / "big.ckpt")
    del big, obj
    before = _rss_mb()
    sd = read_state_dict(tmp_path / "big.ckpt")
    grown = _rss_mb() - before
    assert torch.equal(sd["w"], torch.ones(4))
    assert grown < 64, f"RSS grew by {grown:.0f} MB: the optimizer tensor was materialised"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def test_save_safetensors_roundtrip(tmp_path):
    base = torch.randn(4, 6)
    tensors = {"t": base.t(), "view_a": base[0], "view_b": base[1], "i": torch.arange(3)}
    out = save_safetensors(tensors, tmp_path / "deep" / "dir" / "x.safetensors", {"collab_part": "unet", "n": 3})
    assert out.is_file()
    assert read_checkpoint_metadata(out) == {"collab_part": "unet", "n": "3"}
    got = read_state_dict(out)
    assert got.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(got[k], tensors[k])
    assert not list((tmp_path / "deep" / "dir").glob("*.tmp"))


def test_save_safetensors_rejects_non_tensors(tmp_path):
    with pytest.raises(CheckpointError):
        save_safetensors({"a": 1}, tmp_path / "x.safetensors", {})
