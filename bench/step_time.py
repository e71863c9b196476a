"""Time one collaborative denoising step of the official 512 configuration (random weights, no files).

Prints, measured in this one run:
  * the collaborative step (2 UNets + 2 dynamic diffusers + fusion) — median of --repeat runs;
  * the floor: the sum of the four networks' bare forwards, each timed alone;
  * the fusion overhead: step / floor − 1 (target ≤ 5 %);
  * peak memory (CPU: max RSS of the process; CUDA: max allocated);
  * with --reference DIR (a checkout of the authors' code, optional): the reference's step on the same
    weights and inputs, the largest difference between the two fused predictions and our speed-up.

    python bench/step_time.py [--device cpu|cuda] [--batch 1] [--repeat 5] [--dtypes float32,bfloat16]
                              [--channels-last] [--no-vae] [--attention auto|sdpa] [--reference DIR]

With several --dtypes: a table of each dtype's step, floor and VAE decode, the speed-up over the first, the
fused eps's relative error to the first and peak memory; the last line is ``bfloat16 vs float32: xN.NN per
collaborative step``.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collab_core.fusion import InfluenceConfig  # noqa: E402
from collab_core.pipeline import Branch, CollaborativePipeline, unet_eps  # noqa: E402
from collab_core.tiny_attention import ATTENTION_CHOICES, unavailable_reason, use_tiny_head_attention  # noqa: E402
from collab_core.unet import official_unet_config, unet_state_dict_to_ldm  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    """Median of ``repeat`` calls after one untimed call: the first call of a network in a dtype creates its
    kernels (oneDNN primitives for bfloat16 on a CPU, cuDNN plans on a GPU) and grows the allocator, which a
    sampling loop pays once, not per step (without it a bfloat16 step measured up to 30 % above its floor)."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Encoder(torch.nn.Module):
    """Stands in for a condition encoder: the bench feeds ready-made tokens."""

    def encode(self, tokens):
        return tokens


def random_network(kind: str, device, dtype, seed: int, attention: str = "auto") -> UNet2DConditionModel:
    """The official architecture with random weights, its attention as the pipeline's (``build_unet``) gives it."""
    torch.manual_seed(seed)
    net = UNet2DConditionModel(**official_unet_config(kind).diffusers_kwargs()).to(device)
    if dtype != torch.float32:
        net = net.to(dtype)
    use_tiny_head_attention(net, attention)
    return net.eval().requires_grad_(False)


def attention_label(args, dtype, device) -> str:
    if args.attention == "sdpa":
        return "attention: SDPA (--attention sdpa)"
    reason = unavailable_reason(dtype) if device.type == "cpu" else "not a CPU"
    return "attention: tiny-head kernel" if reason is None else f"attention: SDPA ({reason})"


def reference_step_fn(ref_dir: Path, nets: dict, x, t, ctx, device):
    """The reference's ComposeUNet on our weights (converted back to its layout), when its code imports."""
    sys.path.insert(0, str(ref_dir))
    from ldm.modules.diffusionmodules.openaimodel import UNetModel  # the authors' code, run only here

    def ldm_net(kind, ours):
        official = official_unet_config(kind)
        cfg = dict(image_size=64, in_channels=3, out_channels=3 if kind == "unet" else 1,
                   model_channels=192 if kind == "unet" else 32, attention_resolutions=[8, 4, 2], num_res_blocks=2,
                   channel_mult=[1, 2, 3, 5], num_heads=32, use_spatial_transformer=True, transformer_depth=1,
                   context_dim=640, use_checkpoint=True, legacy=False)
        net = UNetModel(**cfg)
        net.load_state_dict(unet_state_dict_to_ldm(ours.state_dict(), official), strict=True)
        return net.to(device).eval()

    ref = {name: ldm_net("unet" if name.endswith("unet") else "diffuser", net) for name, net in nets.items()}
    try:
        from ldm.models.diffusion.compose_modules import ComposeUNet  # needs pytorch_lightning and omegaconf

        class Wrap(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.diffusion_model = m

            def forward(self, x, t, c_crossattn):
                return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))

        compose = ComposeUNet.__new__(ComposeUNet)
        torch.nn.Module.__init__(compose)
        compose.conditions = ["seg_mask", "text"]
        compose.return_confidence_map = False
        compose.seg_mask_scale_factor, compose.seg_mask_schedule = 2.0, "cosine_decay"
        compose.softmax_twice, compose.boost_factor, compose.manual_prob = False, 1.0, 1.0
        compose.return_each_branch, compose.confidence_input = False, "x_t"
        compose.seg_mask_unet, compose.text_unet = Wrap(ref["mask_unet"]), Wrap(ref["text_unet"])
        compose.seg_mask_confidence_predictor = Wrap(ref["mask_diffuser"])
        compose.text_confidence_predictor = Wrap(ref["text_diffuser"])
        label = "reference ComposeUNet.forward"

        def step():
            return compose(x, t, {"seg_mask": ctx["mask"], "text": ctx["text"]})
    except ImportError as e:  # pragma: no cover - depends on the reference's environment
        from collab_core.fusion import fuse

        label = f"reference UNetModel x4 + fusion (ComposeUNet not importable: {e})"

        def step():
            em = ref["mask_unet"](x, t, context=ctx["mask"])
            et = ref["text_unet"](x, t, context=ctx["text"])
            lm = ref["mask_diffuser"](x, t, context=ctx["mask"])
            lt = ref["text_diffuser"](x, t, context=ctx["text"])
            return fuse([em, et], [lm, lt], ["mask", "text"], t, InfluenceConfig.reference()).eps
    return label, step


def official_vae(device, dtype, seed: int = 5):
    """The official 512 KL-VAE architecture (f8, 3 latent channels), random weights."""
    from diffusers import AutoencoderKL

    from collab_core.vae import VAEConfig

    torch.manual_seed(seed)
    cfg = VAEConfig(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    latent_channels=3)
    return AutoencoderKL(**cfg.diffusers_kwargs()).to(device=device, dtype=dtype).eval().requires_grad_(False)


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on the GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB max RSS"


def run_one(args, dtype: torch.dtype, emit=print) -> dict:
    """Time one dtype: the four bare forwards, the collaborative step, the VAE decode; returns the numbers."""
    # Over 60 lines: a benchmark: one linear run of timings whose numbers all go into one table.
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    nets = {
        "mask_unet": random_network("unet", device, dtype, 1, args.attention),
        "text_unet": random_network("unet", device, dtype, 2, args.attention),
        "mask_diffuser": random_network("diffuser", device, dtype, 3, args.attention),
        "text_diffuser": random_network("diffuser", device, dtype, 4, args.attention),
    }
    if args.channels_last:
        for net in nets.values():
            net.to(memory_format=torch.channels_last)
    pipe = CollaborativePipeline(
        [Branch("mask", nets["mask_unet"], _Encoder(), nets["mask_diffuser"]),
         Branch("text", nets["text_unet"], _Encoder(), nets["text_diffuser"])],
        vae=None, scale_factor=0.141, influence=InfluenceConfig.reference())
    g = torch.Generator().manual_seed(0)
    b = args.batch
    # the latent is float32 whatever the networks run in (CollaborativePipeline.step casts at each network's input)
    x = torch.randn(b, 3, 64, 64, generator=g).to(device)
    t = torch.full((b,), 501, dtype=torch.long, device=device)
    ctx = {"mask": torch.randn(b, 19, 640, generator=g).to(device, dtype),
           "text": torch.randn(b, 77, 640, generator=g).to(device, dtype)}
    xn = x.to(dtype)
    if args.channels_last:
        xn = xn.contiguous(memory_format=torch.channels_last)
    out = {"dtype": str(dtype).split(".")[-1]}
    with torch.inference_mode():
        bare = {}
        for name, net in nets.items():
            c = ctx[name.split("_")[0]]
            bare[name] = timed(lambda: unet_eps(net, xn, t, c), device, args.repeat)
        step = timed(lambda: pipe.step(x, t, ctx), device, args.repeat)
        floor = sum(bare.values())
        out.update(bare=bare, floor=floor, step=step, eps=pipe.step(x, t, ctx).eps.float().cpu())

        emit(f"device {device}, dtype {out['dtype']}, batch {b}, threads {torch.get_num_threads()}, "
             f"median of {args.repeat}" + (", channels-last" if args.channels_last else "")
             + f", {attention_label(args, dtype, device)}")
        for name, s in bare.items():
            emit(f"  bare forward {name:14s} {s * 1000:9.1f} ms")
        emit(f"floor (sum of the four bare forwards) {floor * 1000:9.1f} ms")
        emit(f"collaborative step                    {step * 1000:9.1f} ms")
        emit(f"fusion overhead                       {100 * (step / floor - 1):+8.2f} %  (step / floor = {step / floor:.4f})")
        out["peak"] = peak_memory(device)
        emit(f"peak memory: {out['peak']}")

        if args.vae:
            del pipe, nets
            gc.collect()
            vae = official_vae(device, dtype)
            z = torch.randn(b, 3, 64, 64, generator=g).to(device, dtype)
            vae.decode(z)
            out["vae"] = timed(lambda: vae.decode(z), device, max(1, args.repeat - 1))
            emit(f"VAE decode 64x64 latent -> {8 * 64} px   {out['vae'] * 1000:9.1f} ms")
            del vae

        if args.reference is not None and dtype == torch.float32:
            ours = out["eps"]
            nets = {"mask_unet": random_network("unet", device, dtype, 1, args.attention),
                    "text_unet": random_network("unet", device, dtype, 2, args.attention),
                    "mask_diffuser": random_network("diffuser", device, dtype, 3, args.attention),
                    "text_diffuser": random_network("diffuser", device, dtype, 4, args.attention)}
            gc.collect()
            label, ref_step = reference_step_fn(args.reference, nets, x, t, ctx, device)
            theirs = ref_step()
            diff = (ours.float() - theirs.float().cpu()).abs().max().item()
            ref_time = timed(ref_step, device, args.repeat)
            emit(f"{label}: {ref_time * 1000:9.1f} ms")
            emit(f"max |ours - reference| of the fused eps: {diff:.2e}")
            emit(f"speed-up over the reference: x{ref_time / step:.2f}")
    return out


def _child(args, name, queue):
    from collab_core.precision import resolve_dtype

    res = run_one(args, resolve_dtype(name, args.device), emit=lambda s: print(s, flush=True))
    res["eps"] = res["eps"].numpy()  # plain pickling: a tensor would be shared by a file descriptor that dies with us
    queue.put(res)


def _result_of(proc, queue, name: str) -> dict:
    """The child's numbers, or a clear stop when it died (its traceback is above) instead of waiting forever."""
    import queue as queues

    while True:
        try:
            return queue.get(timeout=5)
        except queues.Empty:
            if not proc.is_alive():
                raise SystemExit(f"the {name} run stopped with exit code {proc.exitcode} (see above)") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtypes", default="float32",
                    help="comma-separated: float32,bfloat16,float16,auto (each in its own process, so that peak "
                         "memory is per dtype); the first is the baseline of the speed-ups")
    ap.add_argument("--half", dest="dtypes", action="store_const", const="float16", help="= --dtypes float16")
    ap.add_argument("--channels-last", action="store_true",
                    help="networks and input in channels-last layout (measured slower on the 2-core AVX512-BF16 "
                         "CPU, see docs/precision.md; off by default)")
    ap.add_argument("--no-vae", dest="vae", action="store_false", help="skip the VAE decode timing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                    help="auto: the tiny-head CPU kernel where it runs, as the pipeline does; sdpa: torch's SDPA "
                         "everywhere (the numbers before the kernel)")
    ap.add_argument("--reference", type=Path, default=None, help="checkout of the authors' repository (optional)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.dtypes.split(",") if n.strip()]
    import multiprocessing as mp

    results = []
    ctx = mp.get_context("spawn")
    for name in names:
        if len(names) == 1:
            from collab_core.precision import resolve_dtype

            results.append(run_one(args, resolve_dtype(name, args.device)))
            break
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(args, name, queue))
        proc.start()
        results.append(_result_of(proc, queue, name))
        proc.join()
        print(flush=True)
    if len(results) > 1:
        base = results[0]
        print(f"{'dtype':10s} {'step ms':>9s} {'floor ms':>9s} {'VAE ms':>9s}  {'step x':>7s} {'floor x':>7s} "
              f"{'VAE x':>7s}  {'fused eps rel. err':>18s}  peak memory")
        for r in results:
            e, e0 = torch.as_tensor(r["eps"]), torch.as_tensor(base["eps"])
            err = ((e - e0).norm() / e0.norm()).item()
            vae = r.get("vae", float("nan"))
            print(f"{r['dtype']:10s} {r['step'] * 1000:9.1f} {r['floor'] * 1000:9.1f} {vae * 1000:9.1f}  "
                  f"x{base['step'] / r['step']:6.2f} x{base['floor'] / r['floor']:6.2f} "
                  f"x{base.get('vae', float('nan')) / vae:6.2f}  {err:18.2e}  {r['peak']}")
        for r in results[1:]:
            print(f"{r['dtype']} vs {base['dtype']}: x{base['step'] / r['step']:.2f} per collaborative step")


if __name__ == "__main__":
    main()
