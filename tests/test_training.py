"""Each trainer runs a few steps on tiny synthetic data: the loss falls, the files are in the official layouts and
reload in the core (``load_pipeline``) with the right settings and no YAML; resuming gives the same weights."""

import json
import shutil

import pytest
import torch

from collab_core.checkpoint import read_checkpoint_metadata, read_state_dict
from collab_core.cli import main
from collab_core.errors import BranchMismatchError, CollabError, ConfigError
from collab_core.fusion import InfluenceConfig
from collab_core.layout import split_checkpoint
from collab_core.models import load_pipeline
from collab_core.training.data import synthetic
from collab_core.training.loop import TrainConfig
from collab_core.training.trainers import (LoadedBranch, TextArch, UNetArch, VAEArch, fusion_val_losses,
                                           load_branch_file, load_vae_file, train_diffusers, train_unimodal, train_vae)

SIZE = 32
UNET = UNetArch(widths=(32, 32), attention=(False, True), layers=1, heads=2)
TEXT = TextArch(dim=32, depth=1, max_length=24)
DIFF = UNetArch(widths=(32,), attention=(True,), layers=1, heads=2)


def cfg(steps=12, lr=2e-3, save_every=None, **kw):
    return TrainConfig(steps=steps, batch_size=8, lr=lr, val_every=steps, save_every=save_every or steps, progress=False,
                       **kw)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks train fastest on one thread, and far faster than on two when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return synthetic(64, size=SIZE), synthetic(16, split="val", size=SIZE)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A tiny VAE, text LDM and mask LDM, trained a few steps each (shared by the tests below)."""
    train_set, val_set = data
    out = tmp_path_factory.mktemp("models")
    vae = train_vae(train_set, val_set, out, cfg(8), VAEArch(widths=(32, 32), layers=1), name="t", crop=16)
    text = train_unimodal(train_set, val_set, out / "t_vae.safetensors", "text", out, cfg(10), arch=UNET, text=TEXT,
                          name="t")
    mask = train_unimodal(train_set, val_set, out / "t_vae.safetensors", "mask", out, cfg(10), arch=UNET,
                          context_dim=32, name="t", latents=text["latents"])
    return {"dir": out, "vae": vae, "text": text, "mask": mask}


def test_vae_trains_and_writes_the_official_vae_layout(trained):
    s = trained["vae"]
    assert s["val_loss_end"] < s["val_loss_start"]
    path = trained["dir"] / "t_vae.safetensors"
    keys = set(read_state_dict(path))
    assert "encoder.conv_in.weight" in keys and "decoder.up.1.upsample.conv.weight" in keys
    assert split_checkpoint(read_state_dict(path), read_checkpoint_metadata(path)).kind == "vae"
    vae, scale = load_vae_file(path)
    assert scale == pytest.approx(s["scale_factor"]) and scale > 0
    meta = json.loads(read_checkpoint_metadata(path)["collab_config"])
    assert meta["scale_factor"] == pytest.approx(scale) and meta["image_size"] == SIZE // 2


@pytest.mark.parametrize("modality", ["text", "mask"])
def test_unimodal_ldm_loss_falls_and_reloads_in_the_core(trained, data, modality, tmp_path):
    s = trained[modality]
    assert s["val_loss_end"] < 0.8 * s["val_loss_start"], (s["val_loss_start"], s["val_loss_end"])
    assert sum(s["train_loss_last"][-3:]) < sum(s["train_loss_first"][:3])
    src = trained["dir"] / f"t_{modality}.safetensors"
    sd = read_state_dict(src)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in sd)
    enc_prefix = "cond_stage_model.transformer." if modality == "text" else "cond_stage_model.linear."
    assert any(k.startswith(enc_prefix) for k in sd) and any(k.startswith("first_stage_model.") for k in sd)
    # loads with heads, scale factor and size from the file alone (no YAML beside it)
    alone = tmp_path / f"x_{modality}.safetensors"
    shutil.copy(src, alone)
    kw = {"text_model": alone} if modality == "text" else {"mask_model": alone}
    pipe = load_pipeline(**kw)
    branch = pipe.branch(modality)
    assert branch.unet.config.attention_head_dim == UNET.heads
    assert pipe.latent_size == SIZE // 2 and pipe.scale_factor == pytest.approx(trained["vae"]["scale_factor"])
    cond = "A young person with tan skin." if modality == "text" else data[1].column("mask").labels[0].numpy()
    res = pipe.generate(conditions={modality: cond}, steps=4, seed=0, progress=False)
    assert res.images.shape == (1, SIZE, SIZE, 3)
    # the YAML written beside the file says the same (for official tools and the ComfyUI loaders)
    from collab_core.yaml_config import read_official_config

    y = read_official_config(src.with_suffix(".yaml"))
    assert y.unet_heads(modality) == UNET.heads and y.scale_factor == pytest.approx(pipe.scale_factor)


def _broken(branch: LoadedBranch) -> LoadedBranch:
    """A copy of a branch whose noise predictions are badly off: the diffusers must learn to ignore it."""
    import copy

    unet = copy.deepcopy(branch.unet)
    with torch.no_grad():
        unet.conv_out.weight.mul_(-4.0)
        unet.conv_out.bias.add_(1.0)
    return LoadedBranch(name=branch.name, unet=unet, encoder=branch.encoder, kind=branch.kind)


@pytest.mark.slow
def test_dynamic_diffusers_learn_the_better_branch_and_write_the_collaborative_layout(trained, data, tmp_path):
    train_set, val_set = data
    d = trained["dir"]
    mask = load_branch_file(d / "t_mask.safetensors")
    text = _broken(load_branch_file(d / "t_text.safetensors"))
    vae, scale = load_vae_file(d / "t_vae.safetensors")
    s = train_diffusers(train_set, val_set, [mask, text], vae, scale, tmp_path, cfg(15, lr=5e-3), arch=DIFF, name="c")
    assert s["val_loss_end"] < 0.8 * s["val_loss_start"], (s["val_loss_start"], s["val_loss_end"])
    path = tmp_path / "c_codiff_mask_text.safetensors"
    sd = read_state_dict(path)
    for prefix in ("model.seg_mask_unet.diffusion_model.", "model.text_unet.diffusion_model.",
                   "model.seg_mask_confidence_predictor.diffusion_model.", "model.text_confidence_predictor.diffusion_model.",
                   "cond_stage_model.seg_mask_cond_stage_model.linear.",
                   "cond_stage_model.text_cond_stage_model.transformer.", "first_stage_model.encoder."):
        assert any(k.startswith(prefix) for k in sd), prefix
    # the file alone is a whole collaborative model; heads come from its metadata
    alone = tmp_path / "alone" / "c_codiff_mask_text.safetensors"
    alone.parent.mkdir()
    shutil.copy(path, alone)
    pipe = load_pipeline(alone.parent)
    assert pipe.names == ["mask", "text"] and all(b.diffuser is not None for b in pipe.branches)
    assert pipe.branches[0].diffuser.config.attention_head_dim == DIFF.heads
    res = pipe.generate(text="A young person.", mask=val_set.column("mask").labels[0].numpy(), steps=4, seed=0,
                        progress=False, influence=InfluenceConfig.plain())
    assert set(res.influence) == {"mask", "text"}
    # the learned influence (training-time softmax) favours the good branch
    mask_w = res.influence["mask"].mean().item()
    assert mask_w > 0.5
    losses = fusion_val_losses(val_set, [mask, text], vae, scale,
                               {b.name: b.diffuser for b in pipe.branches})
    assert losses["dynamic diffusers"] < losses["equal blend"]


def test_any_number_of_branches_with_any_names(trained, data, tmp_path):
    train_set, val_set = data
    d = trained["dir"]
    branches = [load_branch_file(d / "t_mask.safetensors", "parsing"), load_branch_file(d / "t_text.safetensors", "caption"),
                load_branch_file(d / "t_text.safetensors", "caption2")]
    vae, scale = load_vae_file(d / "t_vae.safetensors")
    fields = {"parsing": "mask", "caption": "text", "caption2": "text"}
    s = train_diffusers(train_set, val_set, branches, vae, scale, tmp_path, cfg(3), arch=DIFF, fields=fields, name="n")
    path = tmp_path / "n_codiff_parsing_caption_caption2.safetensors"
    assert str(path) in s["files"]
    pipe = load_pipeline(diffuser=path)
    assert sorted(pipe.names) == ["caption", "caption2", "parsing"]
    res = pipe.generate(conditions={"parsing": val_set.column("mask").labels[0].numpy(), "caption": "old",
                                    "caption2": "red hair"}, steps=2, seed=0, progress=False)
    assert set(res.influence) == {"parsing", "caption", "caption2"}
    with pytest.raises(ConfigError, match="holds text data"):
        train_diffusers(train_set, val_set, branches, vae, scale, tmp_path, cfg(2), arch=DIFF, name="n",
                        fields={"parsing": "text"})
    with pytest.raises(BranchMismatchError, match="at least two"):
        train_diffusers(train_set, val_set, branches[:1], vae, scale, tmp_path, cfg(2), arch=DIFF, name="n")


@pytest.mark.slow
def test_resuming_gives_the_uninterrupted_weights(trained, data, tmp_path):
    train_set, val_set = data
    d = trained["dir"]
    branches = [load_branch_file(d / "t_mask.safetensors"), load_branch_file(d / "t_text.safetensors")]
    vae, scale = load_vae_file(d / "t_vae.safetensors")
    run = lambda out, steps: train_diffusers(train_set, val_set, branches, vae, scale, out, cfg(steps, lr=5e-3, save_every=3),
                                             arch=DIFF, name="r", latents=trained["text"]["latents"])
    run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)  # "interrupted" after 3 steps (state saved) ...
    run(tmp_path / "b", 6)  # ... and resumed to 6
    log = [json.loads(l) for l in (tmp_path / "b" / "r_codiff_run" / "train_log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e["step"] == 3 for e in log)
    a = read_state_dict(tmp_path / "a" / "r_codiff_mask_text.safetensors")
    b = read_state_dict(tmp_path / "b" / "r_codiff_mask_text.safetensors")
    for k in a:
        if "confidence_predictor" in k:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_train_diffuser_command_needs_two_models(tmp_path, capsys, trained):
    code = main(["train-diffuser", "--out", str(tmp_path), "--model", f"text={trained['dir'] / 't_text.safetensors'}"])
    err = capsys.readouterr().err
    assert code == 2 and "at least two" in err and "Traceback" not in err
    code = main(["train-diffuser", "--out", str(tmp_path), "--model", "a=nope.safetensors", "--model", "b=x"])
    assert code == 2 and "no such file" in capsys.readouterr().err


def test_train_commands_run_end_to_end(tmp_path, capsys, trained):
    d = trained["dir"]
    code = main(["train-diffuser", "--data", "synthetic:48", "--val", "8", "--size", str(SIZE), "--out", str(tmp_path),
                 "--name", "cli", "--steps", "2", "--batch", "4", "--widths", "32", "--attention", "1",
                 "--model", f"mask={d / 't_mask.safetensors'}", "--model", f"text={d / 't_text.safetensors'}",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "cli_codiff_mask_text.safetensors").is_file()
    assert (tmp_path / "cli_codiff_mask_text.yaml").is_file()
    code = main(["make-dataset", str(tmp_path / "ds"), "-n", "3", "--size", "32"])
    assert code == 0 and len((tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()) == 3


def test_bad_training_settings_are_refused(data, tmp_path):
    train_set, val_set = data
    with pytest.raises(CollabError, match="multiple of 32"):
        train_vae(train_set, val_set, tmp_path, cfg(1), VAEArch(widths=(48,)))
    with pytest.raises(CollabError, match="learning rate"):
        train_vae(train_set, val_set, tmp_path, cfg(1, lr=0.0))


def test_cosine_schedule_warms_up_then_decays_to_a_tenth():
    from collab_core.training.loop import lr_factor

    c = TrainConfig(steps=110, warmup=10, lr_schedule="cosine")
    f = [lr_factor(s, c) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(50, TrainConfig(steps=110, warmup=10)) == 1.0
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(lr_schedule="step").check()
    with pytest.raises(ConfigError, match="EMA"):
        TrainConfig(ema_decay=1.0).check()


@pytest.mark.slow
def test_weight_average_is_exported_and_survives_resuming(trained, data, tmp_path):
    """With an EMA the exported weights are the average (not the last raw weights), and a resumed run ends with the
    same average as an uninterrupted one."""
    train_set, val_set = data
    d = trained["dir"]
    branches = [load_branch_file(d / "t_mask.safetensors"), load_branch_file(d / "t_text.safetensors")]
    vae, scale = load_vae_file(d / "t_vae.safetensors")
    run = lambda out, steps, ema: train_diffusers(
        train_set, val_set, branches, vae, scale, out, cfg(steps, lr=5e-3, save_every=3, ema_decay=ema), arch=DIFF,
        name="r", latents=trained["text"]["latents"])
    run(tmp_path / "raw", 6, 0.0)
    run(tmp_path / "avg", 6, 0.9)
    run(tmp_path / "res", 3, 0.9)
    run(tmp_path / "res", 6, 0.9)
    files = {k: read_state_dict(tmp_path / k / "r_codiff_mask_text.safetensors") for k in ("raw", "avg", "res")}
    keys = [k for k in files["raw"] if "confidence_predictor" in k and k.endswith("weight")]
    assert any(not torch.allclose(files["raw"][k], files["avg"][k]) for k in keys)
    for k in keys:
        torch.testing.assert_close(files["avg"][k], files["res"][k], rtol=1e-5, atol=1e-6, msg=k)
    (tmp_path / "res" / "r_codiff_run" / "state" / "ema.pt").unlink()
    with pytest.raises(ConfigError, match="without a weight average"):
        run(tmp_path / "res", 9, 0.9)


def test_half_precision_export_keeps_the_noise_schedule_exact(trained, tmp_path):
    """A float16 bundle halves the weights, not the schedule buffers: loaders compare those to the linear
    schedule, and a rounded copy would be refused (ComfyUI) or drift."""
    from collab_core.schedule import make_alphas_cumprod
    from collab_core.training.trainers import _codiff_files

    d = trained["dir"]
    branches = [load_branch_file(d / "t_mask.safetensors"), load_branch_file(d / "t_text.safetensors")]
    vae, scale = load_vae_file(d / "t_vae.safetensors")
    diffusers = {b.name: b.unet for b in branches}  # any UNet will do for the file layout
    paths = _codiff_files(branches, diffusers, vae, scale, SIZE, tmp_path, "half", dtype=torch.float16)
    sd = read_state_dict([p for p in paths if p.suffix == ".safetensors"][0])
    assert sd["alphas_cumprod"].dtype == torch.float32 and sd["betas"].dtype == torch.float32
    assert torch.equal(sd["alphas_cumprod"], make_alphas_cumprod().float())
    assert sd["model.text_unet.diffusion_model.out.2.weight"].dtype == torch.float16


@pytest.mark.slow
def test_build_demo_quick_reproduces_a_whole_bundle(tmp_path):
    """The demo recipe end to end (a few steps of every stage): the bundle it writes loads with no flags and
    records its recipe, stage times, validation losses and sampling setting."""
    from collab_core.training.demo import DemoRecipe, build_demo

    info = build_demo(tmp_path / "bundle", tmp_path / "work", DemoRecipe().quick(), progress=False)
    files = sorted(p.name for p in (tmp_path / "bundle").iterdir())
    assert {"demo_codiff_mask_text.safetensors", "demo_codiff_mask_text.yaml", "default_mask.png",
            "demo.json"} <= set(files)
    assert info["trained_steps"] == {"vae": 10, "text": 10, "mask": 10, "codiff": 10}
    assert info["seconds"]["total"] > 0 and 0 < info["sampling"]["x0_threshold"] < 10
    v = info["validation"]
    assert v["text_ldm_eps_mse"][1] < v["text_ldm_eps_mse"][0] and v["mask_ldm_eps_mse"][1] < v["mask_ldm_eps_mse"][0]
    pipe = load_pipeline(tmp_path / "bundle")
    res = pipe.generate(text=info["default_text"], mask=str(tmp_path / "bundle" / "default_mask.png"), steps=4, seed=0,
                        progress=False, x0_threshold=info["sampling"]["x0_threshold"])
    assert res.images.shape == (1, 64, 64, 3)
