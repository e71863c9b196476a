"""Imagic stages on the tiny fixture models: the loss falls, the loaded weights never change (also when stopped),
stopped stages resume bit for bit, files round-trip, and the collaborative edit samples the edited branches."""

import json

import numpy as np
import pytest
import torch

from collab_core.editing import (ImagicConfig, StageState, collaborative_edit, encode_image, finetune_unet,
                                 interpolate, load_image, load_tuned_unet, optimize_embedding, run_imagic,
                                 save_tuned_unet, tuned_pipeline)
from collab_core.editing.imagic import UnimodalEdit, evaluation_loss
from collab_core.errors import BranchMismatchError, CheckpointError, ConfigError

from test_editing_fixtures import tiny_pipeline, edited_labels, fixture_labels, same_state, state_of, synthetic_photo

TEXT = "She has no hair. She is in her thirties."


@pytest.fixture(scope="module")
def setup(ref_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: thread hand-over costs more than it saves
    pipe = tiny_pipeline(ref_dir)
    labels = fixture_labels(ref_dir)
    z0 = encode_image(pipe, load_image(synthetic_photo(labels)), seed=0)
    targets = pipe.encode({"text": TEXT, "mask": edited_labels(labels)})
    saved = {b.name: state_of(b.unet) for b in pipe.branches}
    yield pipe, z0, targets, saved
    torch.set_num_threads(threads)


def test_photo_latent_is_the_seeded_posterior_sample(setup):
    pipe, z0, _, _ = setup
    image = load_image(synthetic_photo(np.zeros((32, 32), np.int64)))
    dist = pipe.vae.encode(image).latent_dist
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(encode_image(pipe, image, seed=3), pipe.scale_factor * (dist.mean + dist.std * noise))
    assert torch.equal(encode_image(pipe, image, sample=False), pipe.scale_factor * dist.mean)
    assert z0.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("name", ["text", "mask"])
def test_stage_a_loss_falls_and_only_the_embedding_moves(setup, name):
    pipe, z0, targets, saved = setup
    unet = pipe.branch(name).unet
    before = evaluation_loss(unet, z0, targets[name], pipe.alphas_cumprod)
    res = optimize_embedding(unet, z0, targets[name], pipe.alphas_cumprod, iters=20, lr=0.1, progress=False)
    after = evaluation_loss(unet, z0, res.embedding, pipe.alphas_cumprod)
    print(f"stage A [{name}] evaluation loss {before:.4f} -> {after:.4f}")
    # The evaluation loss uses fixed noise, so any fall is the optimisation's (a wrong gradient sign raises it).
    # How far it falls depends on the random weights: 1-3 % on the public set, 0.14 % on one made with weight
    # seed 5 (2 UNet heads), so the bound is "lower", not a fixed share.
    assert after < before
    assert len(res.losses) == 20 and all(np.isfinite(res.losses))
    assert res.embedding.shape == targets[name].shape and not torch.equal(res.embedding, targets[name])
    assert same_state(unet, saved[name]) and all(p.grad is None and not p.requires_grad for p in unet.parameters())


def test_stage_b_loss_falls_on_a_copy(setup):
    pipe, z0, targets, saved = setup
    unet = pipe.branch("text").unet
    emb = targets["text"]
    before = evaluation_loss(unet, z0, emb, pipe.alphas_cumprod)
    res = finetune_unet(unet, z0, emb, pipe.alphas_cumprod, iters=15, lr=1e-4, progress=False)
    after = evaluation_loss(res.unet, z0, emb, pipe.alphas_cumprod)
    print(f"stage B [text] evaluation loss {before:.4f} -> {after:.4f}")
    assert after < before * 0.95
    assert res.unet is not unet and not same_state(res.unet, saved["text"])
    assert not res.unet.training and not any(p.requires_grad for p in res.unet.parameters())
    # The loaded model: same weights, still frozen and in eval mode, no gradients left on it.
    assert same_state(unet, saved["text"]) and not unet.training
    assert all(p.grad is None and not p.requires_grad for p in unet.parameters())


def test_interrupted_fine_tune_leaves_the_model_untouched_and_resumes_exactly(setup):
    pipe, z0, targets, saved = setup
    unet = pipe.branch("mask").unet
    kw = dict(iters=6, lr=1e-4, seed=5, progress=False)
    straight = finetune_unet(unet, z0, targets["mask"], pipe.alphas_cumprod, **kw)
    states = []

    def stop_at_3(info):
        if info["iteration"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_unet(unet, z0, targets["mask"], pipe.alphas_cumprod, on_checkpoint=states.append,
                      callback=stop_at_3, **kw)
    assert same_state(unet, saved["mask"]), "an interrupted fine-tune changed the loaded UNet"
    assert [s.iteration for s in states] == [3] and len(states[0].losses) == 3
    resumed = finetune_unet(unet, z0, targets["mask"], pipe.alphas_cumprod, resume=states[0], **kw)
    assert resumed.losses == straight.losses
    assert same_state(resumed.unet, state_of(straight.unet))
    with pytest.raises(CheckpointError, match="seed 5"):
        finetune_unet(unet, z0, targets["mask"], pipe.alphas_cumprod, resume=states[0], iters=6, lr=1e-4, seed=6)


def test_stage_a_checkpoints_resume_bit_for_bit(setup, tmp_path):
    pipe, z0, targets, _ = setup
    unet = pipe.branch("text").unet
    kw = dict(iters=8, lr=0.05, seed=1, progress=False)
    straight = optimize_embedding(unet, z0, targets["text"], pipe.alphas_cumprod, **kw)
    states = []
    optimize_embedding(unet, z0, targets["text"], pipe.alphas_cumprod, checkpoint_every=3,
                       on_checkpoint=states.append, **kw)
    assert [s.iteration for s in states] == [3, 6]
    states[0].save(tmp_path / "s.pt")
    loaded = StageState.load(tmp_path / "s.pt")
    resumed = optimize_embedding(unet, z0, targets["text"], pipe.alphas_cumprod, resume=loaded, **kw)
    assert torch.equal(resumed.embedding, straight.embedding) and resumed.losses == straight.losses
    (tmp_path / "bad.pt").write_bytes(b"not a state")
    with pytest.raises(CheckpointError, match="delete it"):
        StageState.load(tmp_path / "bad.pt")


def test_run_imagic_writes_resumable_files(setup, tmp_path):
    pipe, z0, targets, saved = setup
    cfg = ImagicConfig(stage1_iters=4, stage1_lr=0.05, stage2_iters=3, stage2_lr=1e-4, checkpoint_every=2)
    calls = []

    def stop_in_stage_b(info):
        calls.append((info["stage"], info["iteration"]))
        if info["stage"] == "finetune" and info["iteration"] == 2 and len(calls) < 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_imagic(pipe, "text", z0, targets["text"], cfg, work_dir=tmp_path, progress=False, callback=stop_in_stage_b)
    assert (tmp_path / "emb_opt.pt").is_file() and (tmp_path / "resume_finetune.pt").is_file()
    assert same_state(pipe.branch("text").unet, saved["text"])
    edit = run_imagic(pipe, "text", z0, targets["text"], cfg, work_dir=tmp_path, progress=False,
                      callback=stop_in_stage_b)
    # Stage A was not rerun; stage B continued at iteration 3.
    assert calls[-1] == ("finetune", 3) and sum(1 for c in calls if c[0] == "embedding") == 4
    for f in ("emb_tgt.pt", "emb_opt.pt", "optDM_unet.safetensors", "losses.json", "run.json"):
        assert (tmp_path / f).is_file(), f
    assert not (tmp_path / "resume_finetune.pt").exists()
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses["embedding"]) == 4 and len(losses["finetune"]) == 3
    assert torch.equal(torch.load(tmp_path / "emb_opt.pt", weights_only=True), edit.optimized.cpu())
    again = run_imagic(pipe, "text", z0, targets["text"], cfg, work_dir=tmp_path, progress=False)  # all done
    assert torch.equal(again.optimized, edit.optimized) and same_state(again.unet, state_of(edit.unet))
    # Another picture in the same folder starts over instead of mixing runs.
    other = run_imagic(pipe, "text", z0 * 0.5, targets["text"], cfg, work_dir=tmp_path, progress=False)
    assert not torch.equal(other.optimized, edit.optimized)


def test_tuned_unet_file_round_trips_in_official_keys(setup, tmp_path):
    pipe, z0, targets, saved = setup
    tuned = finetune_unet(pipe.branch("mask").unet, z0, targets["mask"], pipe.alphas_cumprod, iters=2, lr=1e-3,
                          progress=False).unet
    path = save_tuned_unet(tuned, tmp_path / "optDM_unet.safetensors", "mask")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert "input_blocks.0.0.weight" in f.keys() and f.metadata()["collab_part"] == "unet"
    back = load_tuned_unet(pipe, "mask", path)
    assert same_state(back, state_of(tuned)) and same_state(pipe.branch("mask").unet, saved["mask"])
    with pytest.raises(CheckpointError, match="not found"):
        load_tuned_unet(pipe, "mask", tmp_path / "missing.safetensors")


def test_interpolation():
    tgt, opt = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)
    assert torch.equal(interpolate(tgt, opt, 1.0), tgt) and torch.equal(interpolate(tgt, opt, 0.0), opt)
    assert torch.allclose(interpolate(tgt, opt, 1.5), torch.full((1, 3, 4), 1.5))  # extrapolation, as the reference
    with pytest.raises(BranchMismatchError):
        interpolate(tgt, torch.zeros(1, 2, 4), 0.5)
    with pytest.raises(ConfigError):
        interpolate(tgt, opt, float("nan"))


def test_collaborative_edit_samples_the_edited_branches(setup):
    pipe, z0, targets, saved = setup
    # Untuned edits at alpha = 1 are the target conditions: the same picture as plain collaborative sampling.
    plain = {n: UnimodalEdit(name=n, target=targets[n], optimized=targets[n] * 0.5) for n in ("text", "mask")}
    r = collaborative_edit(pipe, plain, {"text": 1.0, "mask": 1.0}, seed=2, steps=5, progress=False)
    z, maps, _ = pipe.sample(dict(targets), steps=5, eta=1.0, seed=2, progress=False)
    assert torch.equal(r.latents, z) and set(r.influence) == {"mask", "text"}
    assert r.influence["mask"].shape == (5, 1, 1, 16, 16) and r.images.shape == (1, 32, 32, 3)
    # A fine-tuned text UNet changes the result; the loaded pipeline stays as it was.
    tuned = finetune_unet(pipe.branch("text").unet, z0, targets["text"], pipe.alphas_cumprod, iters=2, lr=1e-3,
                          progress=False).unet
    edits = {"text": UnimodalEdit("text", targets["text"], targets["text"] * 0.5, unet=tuned), "mask": plain["mask"]}
    r2 = collaborative_edit(pipe, edits, {"text": 0.7, "mask": 1.0}, seed=2, steps=5, progress=False)
    assert not torch.equal(r2.latents, z)
    assert same_state(pipe.branch("text").unet, saved["text"]) and pipe.branch("text").unet is not tuned
    tp = tuned_pipeline(pipe, {"text": tuned})
    assert tp.branch("text").unet is tuned and tp.branch("mask").unet is pipe.branch("mask").unet
    with pytest.raises(ConfigError, match="alpha\\['mask'\\]"):
        collaborative_edit(pipe, edits, {"text": 0.7}, steps=5, progress=False)
    with pytest.raises(BranchMismatchError):
        collaborative_edit(pipe, {"sketch": plain["text"]}, steps=5, progress=False)
