"""Schedule, fusion and DDIM update against the reference's recorded tensors, plus generalisations."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from collab_core.errors import BranchMismatchError, ConfigError
from collab_core.fusion import BranchInfluence, InfluenceConfig, fuse, schedule_scale, weights_to_logits
from collab_core.sampling import (ddim_step, initial_latent, recorded_noise_sampler, sample_ddim, threshold_x0,
                                  thresholded)
from collab_core.schedule import ddim_schedule, ddim_timesteps, make_alphas_cumprod
from reference_set import reference_set


def runs(ref_dir, kind=None):
    """The manifest's runs (of ``kind``); skips the test when the set has none (tests/reference_set.py)."""
    ref = reference_set(ref_dir)
    return ref.runs_or_skip(kind) if kind is not None else ref.runs_or_skip(*ref.kinds())


def rel_err(a, b):
    return ((a.double() - b.double()).abs() / b.double().abs().clamp_min(1.0)).max().item()


@pytest.mark.parity
def test_schedule_matches_reference(ref_dir):
    inputs = load_file(ref_dir / "inputs.safetensors")
    ac = make_alphas_cumprod()
    assert torch.equal(ac, inputs["schedule/alphas_cumprod"])
    for run in runs(ref_dir):
        g = load_file(ref_dir / run["file"])
        s = ddim_schedule(ac, run["steps"], run["eta"])
        assert s.timesteps.tolist() == run["timesteps"]
        worst = 0.0
        for ours, theirs in [(s.a_t, "a_t"), (s.a_prev, "a_prev"), (s.sigma, "sigma_t"),
                             (s.sqrt_one_minus_a_t, "sqrt_one_minus_at")]:
            worst = max(worst, (ours - g[theirs]).abs().max().item())
        print(f"{run['file']}: schedule max abs error {worst:.3g}")
        assert worst == 0.0


@pytest.mark.parity
def test_fusion_per_step_matches_reference(ref_dir):
    cfg = InfluenceConfig.reference()
    for run in runs(ref_dir, "codiff"):
        g = load_file(ref_dir / run["file"])
        worst = {}
        for i in range(len(run["timesteps"])):
            p = f"step/{i:02d}/"
            t = g["timesteps"][i].repeat(run["batch"])
            r = fuse([g[p + "eps_mask"], g[p + "eps_text"]], [g[p + "infl_raw_mask"], g[p + "infl_raw_text"]],
                     ["mask", "text"], t, cfg)
            pairs = {"softmax": (r.softmax, [g[p + "infl_softmax_mask"], g[p + "infl_softmax_text"]]),
                     "final": (r.weights, [g[p + "infl_final_mask"], g[p + "infl_final_text"]]),
                     "eps_fused": ([r.eps], [g[p + "eps_fused"]]),
                     "gamma": ([schedule_scale("cosine_decay", t)], [g[p + "seg_mask_schedule_scale"]])}
            for k, (ours, theirs) in pairs.items():
                worst[k] = max([worst.get(k, 0.0)] + [rel_err(a, b) for a, b in zip(ours, theirs)])
        print(f"{run['file']}: fusion max rel errors {worst}")
        assert max(worst.values()) <= 1e-6


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["codiff", "text", "mask"])
def test_ddim_loop_matches_reference(ref_dir, kind):
    """Feed the recorded ε; the seeded generator must reproduce x_T, every x_t and z_0."""
    for run in runs(ref_dir, kind):
        g = load_file(ref_dir / run["file"])
        eps_key = "eps_fused" if kind == "codiff" else "eps"
        sched = ddim_schedule(make_alphas_cumprod(), run["steps"], run["eta"])
        gen = torch.Generator().manual_seed(run["seed"])
        x_T = initial_latent([run["batch"]] + run["latent_shape"], gen)
        assert torch.equal(x_T, g["x_T"])
        seen = []

        def denoiser(x, t, _i=iter(range(len(run["timesteps"])))):
            i = next(_i)
            seen.append(rel_err(x, g[f"step/{i:02d}/x_t"]))
            assert t.tolist() == [run["timesteps"][i]] * run["batch"]
            return g[f"step/{i:02d}/{eps_key}"]

        z = sample_ddim(denoiser, x_T, sched, generator=gen, progress=False)
        err = rel_err(z, g["z_0"])
        print(f"{run['file']}: x_t max rel error {max(seen):.3g}, z_0 {err:.3g}")
        assert max(seen) <= 1e-6 and err <= 1e-6


@pytest.mark.parity
def test_ddim_step_pred_x0_and_recorded_noise(ref_dir):
    for run in runs(ref_dir):
        g = load_file(ref_dir / run["file"])
        eps_key = "eps_fused" if run["kind"] == "codiff" else "eps"
        s = ddim_schedule(make_alphas_cumprod(), run["steps"], run["eta"])
        worst = 0.0
        for i in range(len(run["timesteps"])):
            p = f"step/{i:02d}/"
            x_prev, pred_x0 = ddim_step(g[p + "x_t"], g[p + eps_key], s.a_t[i], s.a_prev[i], s.sigma[i],
                                        s.sqrt_one_minus_a_t[i], g[p + "noise"])
            worst = max(worst, rel_err(x_prev, g[p + "x_prev"]), rel_err(pred_x0, g[p + "pred_x0"]))
        noises = [g[f"step/{i:02d}/noise"] for i in range(len(run["timesteps"]))]
        eps_iter = iter(g[f"step/{i:02d}/{eps_key}"] for i in range(len(run["timesteps"])))
        z = sample_ddim(lambda x, t: next(eps_iter), g["x_T"], s, noise_sampler=recorded_noise_sampler(noises),
                        progress=False)
        print(f"{run['file']}: step max rel error {worst:.3g}; replay z_0 {rel_err(z, g['z_0']):.3g}")
        assert worst <= 1e-6 and rel_err(z, g["z_0"]) <= 1e-6


def test_timesteps_like_reference():
    assert ddim_timesteps(50)[:3].tolist() == [1, 21, 41] and ddim_timesteps(50)[-1] == 981
    with pytest.warns(UserWarning, match="takes 8 steps"):
        assert len(ddim_timesteps(7)) == 8
    with pytest.raises(ConfigError, match="past the end"):
        ddim_timesteps(3)
    with pytest.raises(ConfigError):
        ddim_timesteps(0)


def test_gamma_values_from_reference_doc():
    for t, want in [(981, 0.99911), (501, 0.50157), (21, 0.00109)]:
        assert abs(schedule_scale("cosine_decay", torch.tensor([t])).item() - want) < 5e-6
    assert schedule_scale("linear_decay", torch.tensor([500])).item() == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        schedule_scale("cubic", 3)


def test_fusion_n_branches_plain_softmax_is_weighted_mean():
    torch.manual_seed(0)
    eps = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    logits = [torch.randn(2, 1, 8, 8) for _ in range(3)]
    r = fuse(eps, logits, ["a", "b", "c"], torch.tensor([500, 500]), InfluenceConfig.plain())
    w = torch.softmax(torch.cat(logits, 1), 1)
    want = sum(eps[i] * w[:, i:i + 1] for i in range(3))
    assert torch.allclose(r.eps, want, atol=1e-6)
    assert torch.allclose(sum(r.weights), torch.ones(2, 1, 8, 8), atol=1e-6)


def test_fusion_constant_weights_and_painted_maps():
    eps = [torch.full((1, 3, 4, 4), 1.0), torch.full((1, 3, 4, 4), 3.0)]
    # Constant strengths 1:3 → weights 0.25 / 0.75.
    logits = [weights_to_logits(torch.full((1, 1, 4, 4), 1.0)), weights_to_logits(torch.full((1, 1, 4, 4), 3.0))]
    r = fuse(eps, logits, ["mask", "text"], 500, InfluenceConfig.plain())
    assert torch.allclose(r.eps, torch.full_like(r.eps, 2.5))
    # A painted map: left half all branch 0, right half all branch 1.
    paint = torch.zeros(1, 1, 4, 4)
    paint[..., :2] = 1.0
    r = fuse(eps, [weights_to_logits(paint), weights_to_logits(1 - paint)], ["mask", "text"], 500,
             InfluenceConfig.plain())
    assert torch.allclose(r.eps[..., :2], torch.ones(1, 3, 4, 2), atol=1e-5)
    assert torch.allclose(r.eps[..., 2:], torch.full((1, 3, 4, 2), 3.0), atol=1e-5)
    with pytest.raises(ConfigError):
        weights_to_logits(torch.tensor([-1.0]))


def test_reference_shaping_generalises_to_three_branches():
    cfg = InfluenceConfig({"mask": BranchInfluence("cosine_decay", 2.0), "sketch": BranchInfluence("cosine_decay", 2.0),
                           "text": BranchInfluence(complement=True)})
    logits = [torch.randn(1, 1, 4, 4) for _ in range(3)]
    eps = [torch.randn(1, 3, 4, 4) for _ in range(3)]
    r = fuse(eps, logits, ["mask", "text", "sketch"], torch.tensor([981]), cfg)
    assert torch.allclose(sum(r.weights), torch.ones(1, 1, 4, 4), atol=1e-6)
    # Near t = 0 the scheduled branches fade out and text takes over.
    r0 = fuse(eps, logits, ["mask", "text", "sketch"], torch.tensor([1]), cfg)
    assert r0.weights[1].min().item() > 0.9999


def test_fusion_rejects_mismatched_branches():
    with pytest.raises(BranchMismatchError, match="different shapes"):
        fuse([torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 8, 8)], [torch.zeros(1, 1, 8, 8)] * 2, ["a", "b"], 1,
             InfluenceConfig.plain())
    with pytest.raises(BranchMismatchError):
        fuse([torch.zeros(1, 3, 8, 8)] * 2, [torch.zeros(1, 1, 8, 8)], ["a", "b"], 1, InfluenceConfig.plain())
    with pytest.raises(ConfigError, match="complement"):
        cfg = InfluenceConfig({"a": BranchInfluence(complement=True), "b": BranchInfluence(complement=True)})
        fuse([torch.zeros(1, 3, 2, 2)] * 2, [torch.zeros(1, 1, 2, 2)] * 2, ["a", "b"], 1, cfg)


def test_eta_zero_is_deterministic_and_callback_can_interrupt():
    sched = ddim_schedule(make_alphas_cumprod(), 10, 0.0)
    den = lambda x, t: 0.1 * x
    a = sample_ddim(den, torch.ones(1, 3, 4, 4), sched, generator=torch.Generator().manual_seed(1), progress=False)
    b = sample_ddim(den, torch.ones(1, 3, 4, 4), sched, generator=torch.Generator().manual_seed(2), progress=False)
    assert torch.equal(a, b)

    class Stop(Exception):
        pass

    calls = []

    def cb(info):
        calls.append(info["i"])
        if info["i"] == 2:
            raise Stop

    with pytest.raises(Stop):
        sample_ddim(den, torch.ones(1, 3, 4, 4), sched, callback=cb, progress=False)
    assert calls == [0, 1, 2]


def test_threshold_x0_only_touches_samples_beyond_the_limit():
    g = torch.Generator().manual_seed(0)
    inside = torch.randn(1, 3, 8, 8, generator=g)  # |x| 99.5 % quantile about 2.7
    outside = 5 * torch.randn(1, 3, 8, 8, generator=g)
    out = threshold_x0(torch.cat([inside, outside]), 3.5)
    assert torch.equal(out[0], inside[0])
    assert 3.0 < float(torch.quantile(out[1].abs().flatten(), 0.995)) <= 3.5
    assert out[1].abs().max() == pytest.approx(3.5, rel=1e-5)  # the largest values land on the limit
    # order and sign are kept: a monotone squash, not a reshuffle
    assert torch.equal(torch.argsort(out[1].flatten()), torch.argsort(outside.flatten()))
    with pytest.raises(ValueError, match="positive"):
        threshold_x0(inside, 0.0)


def test_thresholded_denoiser_returns_the_eps_of_the_clipped_x0():
    ac = make_alphas_cumprod()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    calls = []

    def wild(x_, t_):  # implies an x0 far outside ±4 at high t
        out = x_ * 0.5 + 3.0
        calls.append((x_, t_, out, out.clone()))
        return out

    t = torch.tensor([981, 981])
    x_before = x.clone()
    eps = thresholded(wild, ac, 4.0)(x, t)
    a = ac[t].double().view(-1, 1, 1, 1)
    x0 = ((x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt())
    assert float(x0.abs().max()) == pytest.approx(4.0, rel=1e-3)
    # The wrapper asks the wrapped denoiser once, at the same x and t, and changes neither the latent nor the
    # denoiser's own output in place: its ε is a new tensor.
    assert len(calls) == 1
    seen_x, seen_t, out, out_then = calls[0]
    assert seen_x is x and torch.equal(seen_t, t)
    assert torch.equal(x, x_before) and torch.equal(out, out_then)
    assert eps.data_ptr() != out.data_ptr() and not torch.equal(eps, out)
    tame = lambda x_, t_: torch.zeros_like(x_)  # x0 = x/√ᾱ at t=0 stays small: nothing changes
    t0 = torch.tensor([0, 0])
    torch.testing.assert_close(thresholded(tame, ac, 4.0)(x, t0), torch.zeros_like(x), atol=1e-5, rtol=0)
