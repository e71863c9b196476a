"""The node pack's host-free helpers (nodes/errors, freeu, branches, conditioning, labels) and the core
functions the loaders use: no ComfyUI needed, runs everywhere.

The pack is imported the way ComfyUI imports it (as a package, relative imports), but without running the
package's ``__init__`` files, which would try to register nodes with a host.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PKG = "collab_pack_pure"


def _load(module: str):
    """``nodes.<module>`` of the pack, imported as the host imports the pack (relative imports work)."""
    for name, path in ((PKG, ROOT), (f"{PKG}.nodes", ROOT / "nodes")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            mod.__package__ = name
            sys.modules[name] = mod
    return importlib.import_module(f"{PKG}.nodes.{module}")


# The host-free modules of the pack, each named for its job.
E = _load("errors")
FREEU = _load("freeu")
BR = _load("branches")
COND = _load("conditioning")
LAB = _load("labels")
core_masks = importlib.import_module(f"{PKG}.collab_core.masks")
core_schedule = importlib.import_module(f"{PKG}.collab_core.schedule")
core_errors = importlib.import_module(f"{PKG}.collab_core.errors")
core_collab = importlib.import_module(f"{PKG}.collab_core.collaborative")
core_settings = importlib.import_module(f"{PKG}.collab_core.settings")  # the loaders' model-folder listing, heads
core_vae = importlib.import_module(f"{PKG}.collab_core.vae")


# ----------------------------------------------------------------------------------------------- errors


def test_node_error_names_node_and_keeps_message():
    err = E.node_error("Load Collaborative Model", core_errors.CheckpointError("file is damaged; download it again"))
    assert str(err) == "[Load Collaborative Model] file is damaged; download it again"
    assert isinstance(err, core_errors.CollabError)
    assert E.node_error("X", err) is err


# ----------------------------------------------------------------------------------------------- files


def test_split_file_lists_separates_checkpoints_and_configs():
    ckpts, cfgs = core_settings.split_file_lists(["512_text.ckpt", "b.yaml", "a.safetensors", "readme.txt", "512_text.ckpt",
                                      "sub/c.YML"])
    assert ckpts == ["512_text.ckpt", "a.safetensors"]
    assert cfgs == ["b.yaml", "sub/c.YML"]


@pytest.mark.parametrize("override,cfg,want", [(0, None, (32, "official default")), (0, 4, (4, "config")),
                                              (8, 4, (8, "node input"))])
def test_resolve_heads_precedence(override, cfg, want):
    assert core_settings.resolve_heads(override, cfg) == want


# ----------------------------------------------------------------------------------------------- VAE


def test_vae_ddconfig_official_512_and_256():
    dd = core_vae.vae_ddconfig((128, 256, 512, 512), 2, 3)
    assert dd["ch"] == 128 and dd["ch_mult"] == [1, 2, 4, 4] and dd["z_channels"] == 3
    assert dd["num_res_blocks"] == 2 and dd["attn_resolutions"] == [] and dd["double_z"] is True
    assert core_vae.vae_ddconfig((128, 256, 512), 2, 3)["ch_mult"] == [1, 2, 4]
    assert core_vae.vae_ddconfig((32, 32), 1, 3)["ch_mult"] == [1, 1]  # the tiny fixture VAE


def test_vae_ddconfig_refuses_what_the_host_vae_cannot_build():
    with pytest.raises(core_errors.ConfigError, match="multiples"):
        core_vae.vae_ddconfig((128, 200), 2, 3)
    with pytest.raises(core_errors.ConfigError, match="middle attention"):
        core_vae.vae_ddconfig((128, 256), 2, 3, mid_attention=False)


# ----------------------------------------------------------------------------------------------- FreeU


def test_freeu_targets_the_reference_stages_of_the_official_unet():
    # the authors' FreeU: h with 576 channels gets b1/s1, 384 gets b2/s2 (192-channel UNet, mult [1,2,3,5])
    assert FREEU.freeu_scales(192, [1, 2, 3, 5], 1.1, 1.2, 1.0, 1.0) == {576: (1.1, 1.0), 384: (1.2, 1.0)}


def test_freeu_matches_the_stock_node_on_sd_widths():
    assert FREEU.freeu_scales(320, [1, 2, 4, 4], 1.3, 1.4, 0.9, 0.2) == {1280: (1.3, 0.9), 640: (1.4, 0.2)}
    assert FREEU.freeu_scales(32, [1, 1], 1.1, 1.2, 1.0, 1.0) == {32: (1.1, 1.0)}


def test_fourier_filter_identity_and_low_frequency_scaling():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    assert FREEU.fourier_filter(x, 1, 1.0) is x
    # scale 0 on the centre after fftshift removes the DC term: every plane becomes zero-mean
    y = FREEU.fourier_filter(x, 1, 0.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.allclose(y.mean(dim=(-2, -1)), torch.zeros(2, 4), atol=1e-5)
    assert not torch.allclose(y, x)
    # a constant plane is pure DC: scaling the centre by s scales it by s
    c = torch.full((1, 1, 8, 8), 3.0)
    assert torch.allclose(FREEU.fourier_filter(c, 1, 0.5), c * 0.5, atol=1e-5)


def test_freeu_apply_scales_first_half_of_matching_width_only():
    h = torch.ones(1, 4, 4, 4)
    skip = torch.full((1, 4, 4, 4), 2.0)
    h2, s2 = FREEU.freeu_apply(h, skip, {4: (1.5, 0.5)})
    assert torch.allclose(h2[:, :2], torch.full_like(h2[:, :2], 1.5)) and torch.allclose(h2[:, 2:], h[:, 2:])
    assert torch.allclose(s2, skip * 0.5, atol=1e-5)
    h3, s3 = FREEU.freeu_apply(h, skip, {8: (1.5, 0.5)})
    assert h3 is h and s3 is skip


# ----------------------------------------------------------------------------------------------- sampling


def test_reference_plan_recognises_the_ddim_uniform_grid():
    plan = core_schedule.reference_plan([901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
    assert plan == core_schedule.ReferencePlan(total_steps=10, start=0) and plan.full
    ts50 = core_schedule.ddim_timesteps(50)[::-1].tolist()
    assert core_schedule.reference_plan(ts50).total_steps == 50


def test_reference_plan_for_denoise_tails_and_foreign_schedules():
    # steps 10 at denoise 0.5: the host computes int(10/0.5) = 20 steps and keeps the last 10
    tail = core_schedule.ddim_timesteps(20)[::-1].tolist()[-10:]
    plan = core_schedule.reference_plan(tail)
    assert plan.total_steps == 20 and plan.start == 10 and not plan.full
    assert core_schedule.reference_plan([999, 700, 400, 1]) is None  # e.g. karras: not the reference grid
    assert core_schedule.reference_plan([1, 101]) is None  # ascending
    assert core_schedule.reference_plan([]) is None


# ----------------------------------------------------------------------------------------------- branches


def _b(i, name, ch=3, sig=None, start=0.0, end=1.0, strength=1.0):
    return BR.BranchCheck(index=i, modality=name, latent_channels=ch, sigmas=sig, start_percent=start,
                         end_percent=end, strength=strength)


def test_check_branches_accepts_the_reference_pair():
    s = torch.linspace(0.03, 80, 1000)
    BR.check_branches([_b(0, "mask", sig=s), _b(1, "text", sig=s.clone())], ["mask", "text"], "N")
    BR.check_branches([_b(0, "text", sig=s), _b(1, "mask", sig=s)], None, "N")


@pytest.mark.parametrize("branches,diffuser,pattern", [
    ([], None, "no branches"),
    ([_b(0, "text"), _b(1, "text")], None, "distinct modality"),
    ([_b(0, "text", ch=3), _b(1, "mask", ch=4)], None, "different latent channels"),
    ([_b(0, "text", sig=torch.linspace(0.03, 80, 1000)), _b(1, "mask", sig=torch.linspace(0.03, 14, 1000))], None,
     "different noise schedule"),
    ([_b(0, "text", start=0.5, end=0.2)], None, "start < end"),
    ([_b(0, "text", end=0.4), _b(1, "mask", start=0.6)], None, "0.40-0.60"),
    ([_b(0, "text", strength=-1)], None, "strength"),
    ([_b(0, "text"), _b(1, "sketch")], ["mask", "text"], "no network for \\['sketch'\\]"),
    ([_b(0, "text")], ["mask", "text"], "add a branch for \\['mask'\\]"),
])
def test_check_branches_refuses_with_the_fix(branches, diffuser, pattern):
    with pytest.raises(E.CollabNodeError, match=pattern) as info:
        BR.check_branches(branches, diffuser, "Collaborative KSampler")
    assert str(info.value).startswith("[Collaborative KSampler] ")


def test_uncovered_ranges():
    assert BR.uncovered_ranges([(0, 1)]) == []
    assert BR.uncovered_ranges([(0, 0.5), (0.5, 1)]) == []
    assert BR.uncovered_ranges([(0.1, 0.3), (0.2, 0.8)]) == [(0.0, 0.1), (0.8, 1.0)]


def test_active_at_uses_sigma_ranges_inclusively():
    ranges = [(1e9, 0.0), (10.0, 2.0)]
    assert BR.active_at(ranges, 20.0) == [True, False]
    assert BR.active_at(ranges, 10.0) == [True, True]
    assert BR.active_at(ranges, 1.0) == [True, False]


def test_influence_logit_strength_and_painted_map_act_as_weights():
    shape = (2, 1, 4, 4)
    zero = core_collab.influence_logit(None, shape)
    assert torch.equal(zero, torch.zeros(shape))
    two = core_collab.influence_logit(None, shape, strength=2.0)
    painted = torch.zeros(1, 1, 4, 4)
    painted[..., :2] = 1.0
    half = core_collab.influence_logit(torch.ones(shape), shape, weights=painted)
    # softmax over [branch with strength 2, branch with strength 1] gives 2/3 vs 1/3
    w = torch.softmax(torch.cat([two, zero], 1), 1)
    assert torch.allclose(w[:, 0], torch.full((2, 4, 4), 2 / 3))
    # a painted 0 removes the influence there, a painted 1 keeps the diffuser's logit
    assert torch.allclose(half[..., :2], torch.ones(2, 1, 4, 2))
    assert bool((half[..., 2:] < -10).all())


def test_painted_to_latent_resizes_and_validates():
    m = torch.zeros(1, 32, 32)
    m[:, :, 16:] = 1
    out = BR.painted_to_latent(m, (8, 8), batch=2)
    assert out.shape == (1, 1, 8, 8) and float(out[..., :3].max()) == 0 and float(out[..., 5:].min()) == 1
    with pytest.raises(core_errors.ConfigError, match="batch"):
        BR.painted_to_latent(torch.zeros(3, 8, 8), (8, 8), batch=2)
    with pytest.raises(core_errors.ConfigError, match=">= 0"):
        BR.painted_to_latent(-torch.ones(1, 8, 8), (8, 8), batch=1)


# ----------------------------------------------------------------------------------------------- conditioning


def test_conditioning_roundtrip_and_checks():
    ctx = torch.randn(1, 77, 640)
    cond = COND.make_conditioning(ctx)
    assert cond[0][1] == {} and COND.conditioning_context(cond) is ctx
    for bad in (None, [], [[torch.zeros(3)]], "text"):
        with pytest.raises(core_errors.ConditioningError):
            COND.conditioning_context(bad)
    COND.check_context_dim(ctx, 640, "text")
    with pytest.raises(core_errors.ConditioningError, match="same checkpoint"):
        COND.check_context_dim(ctx, 4, "text")


# ----------------------------------------------------------------------------------------------- masks


def _labels():
    lab = np.zeros((16, 16), dtype=np.int64)
    lab[2:14, 3:13] = 1  # skin
    lab[0:3] = 13  # hair
    lab[9, 6:10] = 11  # upper lip
    lab[15] = 18  # cloth
    return lab


def test_labels_from_host_colour_image_and_label_masks():
    lab = _labels()
    img = torch.from_numpy(core_masks.colorize_labels(lab).astype(np.float32) / 255.0)[None]
    assert np.array_equal(LAB.labels_from_host(image=img)[0], lab)
    as_255 = LAB.labels_to_host_mask([lab])  # the LoadImageMask convention
    assert as_255.shape == (1, 16, 16) and float(as_255.max()) == pytest.approx(18 / 255)
    assert np.array_equal(LAB.labels_from_host(mask=as_255)[0], lab)
    assert np.array_equal(LAB.labels_from_host(mask=torch.from_numpy(lab.astype(np.float32)))[0], lab)
    two = LAB.labels_from_host(image=img.repeat(2, 1, 1, 1))
    assert len(two) == 2


def test_labels_from_host_refuses_the_wrong_kind_of_mask():
    lab = _labels()
    with pytest.raises(core_errors.ConditioningError, match="exactly one"):
        LAB.labels_from_host()
    with pytest.raises(core_errors.ConditioningError, match="soft values"):
        LAB.labels_from_host(mask=torch.rand(1, 16, 16) * 0.5 + 0.25)
    with pytest.raises(core_errors.ConditioningError, match="label_mask"):
        LAB.labels_from_host(image=torch.zeros(1, 16, 16))  # a MASK wired into 'image'
    with pytest.raises(core_errors.ConditioningError, match="image"):
        LAB.labels_from_host(mask=torch.zeros(1, 16, 16, 3))
    rgb = core_masks.colorize_labels(lab).astype(np.float32)
    rgb[0, 0] = (10, 200, 90)
    with pytest.raises(core_errors.ConditioningError, match="not CelebAMask-HQ class colours"):
        LAB.labels_from_host(image=torch.from_numpy(rgb / 255.0)[None])
    # a JPEG-like colour error within the tolerance snaps to the class colour
    rgb2 = core_masks.colorize_labels(lab).astype(np.float32)
    rgb2[5, 5] += 4
    out = LAB.labels_from_host(image=torch.from_numpy(np.clip(rgb2, 0, 255) / 255.0)[None], tolerance=10)
    assert np.array_equal(out[0], lab)


def test_labels_to_preview_is_the_celebamask_colours():
    lab = _labels()
    img = LAB.labels_to_preview([lab, lab])
    assert img.shape == (2, 16, 16, 3) and img.dtype == torch.float32
    assert tuple((img[0, 0, 0] * 255).round().int().tolist()) == core_masks.CLASS_COLORS[13]
    with pytest.raises(core_errors.ConditioningError, match="different sizes"):
        LAB.labels_to_preview([lab, lab[:8]])


# ----------------------------------------------------------------------------------------------- influence


def test_influence_outputs_layout():
    s, b, h, w = 3, 2, 4, 4
    maps = {"mask": torch.rand(s, b, 1, h, w), "text": torch.rand(s, b, 1, h, w)}
    image, raw = BR.influence_outputs(maps, ["mask", "text"])
    assert image.shape[0] == b * 2 and image.shape[-1] == 3 and image.dtype == torch.float32
    assert raw.shape == (b * 2 * s, h, w)
    # order: sample, branch, step
    assert torch.allclose(raw[s * 1 + 2], maps["text"][2, 0, 0])
    assert torch.allclose(raw[s * 2 + 0], maps["mask"][0, 1, 0])
    # the grid is the reference's: tile k at padding + k·(w + padding)
    assert torch.allclose(image[0, 2:2 + h, 2:2 + w, 0], maps["mask"][0, 0, 0], atol=1 / 255 + 1e-6)
    empty_img, empty_mask = BR.influence_outputs({}, [])
    assert empty_img.dim() == 4 and empty_mask.dim() == 3


# ----------------------------------------------------------------------------------------------- workflows


WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflows_are_ui_format_with_consistent_links(path):
    wf = json.loads(path.read_text())
    assert {"last_node_id", "last_link_id", "nodes", "links", "version"} <= set(wf)
    ids = {n["id"] for n in wf["nodes"]}
    assert max(ids) <= wf["last_node_id"]
    for link in wf["links"]:
        lid, src, src_slot, dst, dst_slot, typ = link
        assert src in ids and dst in ids
        srcn = next(n for n in wf["nodes"] if n["id"] == src)
        dstn = next(n for n in wf["nodes"] if n["id"] == dst)
        assert lid in (srcn["outputs"][src_slot]["links"] or [])
        assert dstn["inputs"][dst_slot]["link"] == lid
        assert srcn["outputs"][src_slot]["type"] == typ or typ == "*"
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    text = " ".join(" ".join(map(str, n.get("widgets_values", []))) for n in notes)
    assert notes and (".ckpt" in text or ".safetensors" in text), \
        "each workflow carries a note naming the checkpoints it expects"


def test_there_are_the_four_promised_workflows():
    stems = {p.stem for p in WORKFLOWS}
    assert len(stems) >= 4, stems
