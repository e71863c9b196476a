"""DDIM inversion + resampling: exact start/end points, stated reconstruction tolerances, preserved regions.

Tolerances (max |z − z₀| on latents of std ≈ 0.7):
* an analytic denoiser (Gaussian data, exact ε), 50 steps, plain inversion with 3 fixed-point refinements: 1e-4;
* the fixture collaborative model (random weights: far from contractive at high noise, or on latents as small as
  its random VAE makes them), a latent of std 0.8, 50 steps, strength 0.2, 3 refinements, no correction: 1e-3;
* with ``correct=True``: exact (0) at any strength, by construction (every stored landing is recomputed bit for
  bit); the tests check what can fail around it: the landings are the sampler's residuals, resampling uses them,
  and without them the reconstruction is far off.
"""

import numpy as np
import pytest
import torch

from collab_core.editing import (ddim_invert, edit_by_inversion, encode_image, invert_step, load_image,
                                 sample_from_inversion, steps_for_strength)
from collab_core.editing.edit import recording_denoiser
from collab_core.errors import ConditioningError, ConfigError
from collab_core.sampling import ddim_step
from collab_core.schedule import ddim_schedule, make_alphas_cumprod

from test_editing_fixtures import tiny_pipeline, edited_labels, fixture_labels, same_state, state_of, synthetic_photo

SIGMA = 0.7
AC = make_alphas_cumprod()


def gaussian_denoiser(x, t):
    """The exact ε-prediction for data ~ N(0, SIGMA²): E[ε | x_t] = √(1−ᾱ)·x_t / (ᾱσ² + 1 − ᾱ)."""
    a = AC[t.cpu()].view(-1, 1, 1, 1).to(x)
    return (1 - a).sqrt() * x / (a * SIGMA ** 2 + 1 - a)


def z_gauss():
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * SIGMA


def test_inversion_climbs_the_samplers_own_ladder():
    """Inversion starts at the sampler's last level ᾱ[0] = 0.9985 (not 1) and ends at its first level ᾱ[τ_max]."""
    s = ddim_schedule(AC, 10, 0.0)
    assert float(s.a_prev[-1]) == pytest.approx(0.9985) and int(s.timesteps[0]) == 901
    z0 = z_gauss()
    inv = ddim_invert(gaussian_denoiser, z0, s, refine=3, progress=False)
    assert sorted(inv.states) == list(range(11)) and inv.z0 is z0 and inv.x_T is inv.states[0]
    # The ending level: for Gaussian data the probability-flow ODE from ᾱ[0] to ᾱ[τ] scales the latent by
    # r = √((ᾱσ²+1−ᾱ)/(ᾱ₀σ²+1−ᾱ₀)); DDIM, a first-order solver of it, approaches r as the steps grow.
    ratios = []
    for steps in (10, 50):
        ss = ddim_schedule(AC, steps, 0.0)
        a, a0 = float(AC[int(ss.timesteps[0])]), float(AC[0])
        r = ((a * SIGMA ** 2 + 1 - a) / (a0 * SIGMA ** 2 + 1 - a0)) ** 0.5
        got = ddim_invert(gaussian_denoiser, z0, ss, refine=3, progress=False).x_T / z0
        assert torch.allclose(got, got.mean().expand_as(got), rtol=1e-3)  # a pure scaling, as the ODE's
        ratios.append(abs(float(got.mean()) / r - 1))
    assert ratios[1] < 0.06 and ratios[1] < ratios[0]
    # invert_step is the exact inverse of a sampling step when ε is the same.
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for i in (0, 5, 9):
        back, _ = ddim_step(invert_step(x, eps, s, i), eps, s.a_t[i], s.a_prev[i], 0.0, s.sqrt_one_minus_a_t[i],
                            torch.zeros_like(x))
        assert torch.allclose(back, x, atol=1e-5)


def test_gaussian_reconstruction_within_tolerance_and_refinement_helps():
    s = ddim_schedule(AC, 50, 0.0)
    z0 = z_gauss()
    errors = []
    for refine in (0, 1, 3):
        inv = ddim_invert(gaussian_denoiser, z0, s, refine=refine, progress=False)
        errors.append(float((sample_from_inversion(gaussian_denoiser, inv, progress=False) - z0).abs().max()))
    print("analytic denoiser, 50 steps, max |z - z0| for refine 0/1/3:", errors)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4
    # Inverting from the clean level ᾱ = 1 (treating the photo as noise-free, off by the sampler's last step) and
    # then sampling with the sampler's own ladder misses the tolerance by far.
    from dataclasses import replace

    wrong_prev = s.a_prev.clone()
    wrong_prev[-1] = 1.0
    inv = ddim_invert(gaussian_denoiser, z0, replace(s, a_prev=wrong_prev), refine=3, progress=False)
    inv = replace(inv, schedule=s)
    off = float((sample_from_inversion(gaussian_denoiser, inv, progress=False) - z0).abs().max())
    print(f"inverting from level 1 instead of 0.9985: max |z - z0| = {off:.3g}")
    assert off > 100 * errors[2]


@pytest.fixture(scope="module")
def setup(ref_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = tiny_pipeline(ref_dir)
    labels = fixture_labels(ref_dir)
    yield pipe, labels, synthetic_photo(labels)
    torch.set_num_threads(threads)


def _residual(den, inv) -> float:
    """max_i |x_{i+1} − step_i(x_i)| of an inversion under ``den``, computed here from the states alone."""
    s, worst = inv.schedule, 0.0
    for i in range(inv.start, len(s)):
        x = inv.states[i]
        t = torch.full((x.shape[0],), int(s.timesteps[i]), dtype=torch.long)
        landing, _ = ddim_step(x, den(x, t), s.a_t[i], s.a_prev[i], 0.0, s.sqrt_one_minus_a_t[i], torch.zeros_like(x))
        worst = max(worst, float((inv.states[i + 1] - landing).abs().max()))
    return worst


def test_collaborative_model_reconstruction(setup):
    """Uncorrected inversion of the fixture model: refinement brings the reconstruction within 1e-3, and the
    mismatch it reports is small only for the denoiser it inverted with."""
    pipe, labels, photo = setup
    ctx = pipe.encode({"mask": labels, "text": "She has long black hair."})
    den = recording_denoiser(pipe, ctx)
    z = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    s = ddim_schedule(pipe.alphas_cumprod, 50, 0.0)
    start = 50 - steps_for_strength(50, 0.2)
    errors, invs = [], []
    for refine in (0, 3):
        invs.append(ddim_invert(den, z, s, start=start, refine=refine, progress=False))
        errors.append(float((sample_from_inversion(den, invs[-1], progress=False) - z).abs().max()))
    print(f"fixture model, 50 steps, strength 0.2, refine 0/3, no correction: max |z - z0| = {errors}")
    # measured 0.14 (refine 0) and 4.2e-4 (refine 3)
    assert errors[1] < 1e-3 < errors[0]
    # The refined inversion is close to the exact inverse of *this* denoiser's sampling steps: states inverted
    # with other conditions leave a ~50x larger residual under it (measured 3.8e-4 vs 1.9e-2).
    other = recording_denoiser(pipe, pipe.encode({"mask": edited_labels(labels), "text": "A bald old man."}))
    bad = ddim_invert(other, z, s, start=start, refine=3, progress=False)
    good_residual, bad_residual = _residual(den, invs[1]), _residual(den, bad)
    print(f"residual under the inverting denoiser {good_residual:.3g}, of an inversion with other conditions "
          f"{bad_residual:.3g}")
    assert good_residual < 1e-3 and bad_residual > 10 * good_residual


def test_correction_replays_the_photo_for_any_inversion(setup):
    """``correct=True`` makes the reconstruction exact by construction, even where inversion fails (the random
    model at full strength on its tiny latents): it is the stored landings, not the inversion, that give the photo
    back. What can fail here: the landings not being step_i(x_i), resampling not using them, or using them in place
    of the denoiser (then other conditions would change nothing)."""
    pipe, labels, photo = setup
    den = recording_denoiser(pipe, pipe.encode({"mask": labels, "text": "She has long black hair."}))
    z0 = encode_image(pipe, load_image(photo), sample=False)
    inv = ddim_invert(den, z0, ddim_schedule(pipe.alphas_cumprod, 10, 0.0), refine=1, correct=True, progress=False)
    assert inv.mismatch() > 0.1 and inv.mismatch() == pytest.approx(_residual(den, inv), rel=1e-6)
    assert torch.equal(sample_from_inversion(den, inv, progress=False), z0)
    from dataclasses import replace

    uncorrected = sample_from_inversion(den, replace(inv, landings=None), progress=False)
    print(f"full strength, 10 steps: mismatch {inv.mismatch():.3g}, uncorrected max |z - z0| "
          f"{float((uncorrected - z0).abs().max()):.3g}")
    assert float((uncorrected - z0).abs().max()) > 1.0  # measured 46: without the correction, far off
    other = recording_denoiser(pipe, pipe.encode({"mask": edited_labels(labels), "text": "A bald old man."}))
    assert not torch.allclose(sample_from_inversion(other, inv, progress=False), z0, atol=1e-3)


def test_edit_keeps_the_latent_outside_the_changed_region(setup):
    pipe, labels, photo = setup
    saved = {b.name: state_of(b.unet) for b in pipe.branches}
    target = edited_labels(labels)
    r = edit_by_inversion(pipe, photo, {"mask": target, "text": "x"}, {"mask": labels}, steps=5, refine=1,
                          reconstruct=True, progress=False)
    outside = r.region == 0
    assert r.region.shape == (1, 1, 16, 16) and 0 < r.region.mean() < 1
    assert torch.equal(r.latents.masked_select(outside), r.z0.masked_select(outside))
    assert not torch.allclose(r.latents.masked_select(~outside), r.z0.masked_select(~outside))
    # The check resample is the photo latent exactly: by construction with the correction on, as long as it replays
    # the inversion's own (source) conditions -- with the target conditions it would not be (see
    # test_correction_replays_the_photo_for_any_inversion). So this shows it resampled with the source conditions.
    assert r.settings["correct"] and torch.equal(r.reconstruction, r.z0)
    assert r.influence["mask"].shape == (5, 1, 1, 16, 16) and r.images.shape == (1, 32, 32, 3)
    # The region covers every changed pixel (grown by one latent pixel).
    assert (r.region_pixels()[r.changed] == 1).all()
    assert all(same_state(b.unet, saved[b.name]) for b in pipe.branches)
    # Regenerating the region from fresh noise: the outside stays the photo's, the inside changes more.
    fresh = edit_by_inversion(pipe, photo, {"mask": target, "text": "x"}, {"mask": labels}, steps=5, refine=0,
                              inside="noise", seed=3, progress=False)
    assert torch.equal(fresh.latents.masked_select(outside), fresh.z0.masked_select(outside))
    assert not torch.equal(fresh.latents, r.latents) and fresh.settings["inside"] == "noise"
    with pytest.raises(ConditioningError, match="needs one"):
        edit_by_inversion(pipe, photo, {"mask": target}, {"mask": labels}, steps=5, preserve=False, inside="noise",
                          progress=False)
    # Partial strength re-runs only the last steps; without preservation the whole latent may change.
    free = edit_by_inversion(pipe, photo, {"mask": target}, {"mask": labels}, steps=5, strength=0.6, preserve=False,
                             progress=False)
    assert free.settings["start_step"] == 2 and free.region is None
    assert free.influence == {}  # one condition: the mask model alone, nothing to fuse


def test_inversion_edit_errors(setup):
    pipe, labels, photo = setup
    with pytest.raises(ConditioningError, match="nothing to edit"):
        edit_by_inversion(pipe, photo, {"mask": labels, "text": "a"}, {"mask": labels}, steps=4, progress=False)
    with pytest.raises(ConditioningError, match="preservation"):
        edit_by_inversion(pipe, photo, {"mask": labels, "text": "a"}, {"mask": labels, "text": "b"}, steps=4,
                          progress=False)
    with pytest.raises(ConditioningError, match="target mask 16×16"):
        edit_by_inversion(pipe, photo, {"mask": labels[:16, :16]}, {"mask": labels}, steps=4, progress=False)
    bad = np.zeros((32, 32, 3), np.uint8)
    bad[0, 0] = (1, 2, 3)
    with pytest.raises(ConditioningError, match="(?s)^target mask: .*rgb\\(1, 2, 3\\)"):
        edit_by_inversion(pipe, photo, {"mask": bad}, {"mask": labels}, steps=4, progress=False)
    with pytest.raises(ConditioningError, match="not RGB"):
        from PIL import Image

        edit_by_inversion(pipe, Image.fromarray(photo).convert("L"), {"mask": edited_labels(labels)},
                          {"mask": labels}, steps=4, progress=False)
    with pytest.raises(ConditioningError, match="multiple of the VAE"):
        edit_by_inversion(pipe, photo[:31, :31], {"mask": labels[:31, :31]}, steps=4, progress=False)
    with pytest.raises(ConfigError, match="strength"):
        edit_by_inversion(pipe, photo, {"mask": edited_labels(labels)}, {"mask": labels}, strength=0, progress=False)
