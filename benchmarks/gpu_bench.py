"""The prepared GPU benchmark (run by ``benchmarks/gpu.sh``): every attnguide method and the peers on
SD 1.5- and SDXL-shaped random-weight models in fp16, within a time budget.

    python benchmarks/gpu_bench.py --out OUT                 # CUDA, fp16, the full plan below
    python benchmarks/gpu_bench.py --out OUT --dry-run       # CPU, tiny model, seconds (the test suite)

Points, cheapest first (each: batch 1 and 4): SD 1.5 at 512, SDXL at 1024, SD 1.5 at 1024 and 1536.
The VAE decode is replaced by zeros (``no_decode``): only the denoising steps are measured.
Configurations per point: ``none, cfg, pag, cfg+pag, scfg, scfg+pag``, diffusers' ``StableDiffusion(XL)
Pipeline`` (``diffusers-cfg``) and PAG pipelines (``diffusers-pag``, ``diffusers-cfg+pag``), the unfused
S-CFG cost model (``unfused-scfg``, see ``attnguide.evaluation.bench.unfused_attention``) and diffusers'
modular PAG guider (``diffusers-modular-pag``, SDXL only; reported as skipped where it does not run).

Time per step: CUDA events from the step's first U-Net call to the end of the step (after guidance and
the scheduler), median over the steps of ``--repeats`` timed calls after one warm-up call; the modular
pipeline (several U-Net calls per step, no step callback) is timed from its first U-Net call to its last
over the steps. Peak memory: ``torch.cuda.max_memory_allocated`` over the timed call, after a reset.
Ratios are to attnguide's ``cfg`` in the same point. After every configuration the JSON and the markdown
table are rewritten in ``--out`` (a timeout keeps what was done); a point or configuration whose estimated
time does not fit the remaining budget is skipped and listed as such. Out-of-memory is recorded, not fatal.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from attnguide.evaluation import bench, bench_models, bench_peers  # noqa: E402

T0 = time.monotonic()
PLAN = [("sd15", 512, 1), ("sd15", 512, 4), ("sdxl", 1024, 1), ("sd15", 1024, 1), ("sdxl", 1024, 4),
        ("sd15", 1024, 4), ("sd15", 1536, 1), ("sd15", 1536, 4)]
DRY_PLAN = [("tiny", 32, 1), ("tiny", 32, 4), ("tiny-sdxl", 32, 1)]
MODULAR = "diffusers-modular-pag"


def _elapsed() -> float:
    return time.monotonic() - T0


class Clock:
    """CUDA events on a GPU, ``perf_counter`` on a CPU: ``mark()`` now; ``ms(a, b)`` after ``sync()``."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)


def _modular_runner(pipe, settings, device):
    """diffusers' modular SDXL pipeline with its PerturbedAttentionGuidance guider (CFG + PAG on the mid
    block, every step) on ``pipe``'s components; raises where this diffusers has no such thing."""
    from diffusers.guiders import PerturbedAttentionGuidance
    from diffusers.hooks import LayerSkipConfig
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    if not bench_peers.is_sdxl(pipe):
        raise RuntimeError("the modular PAG guider is run on SDXL only (diffusers' modular SD 1.5 blocks do not exist)")
    blocks = StableDiffusionXLAutoBlocks()
    modular = blocks.init_pipeline()
    guider = PerturbedAttentionGuidance(
        guidance_scale=settings.guidance_scale, perturbed_guidance_scale=settings.pag_scale,
        perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
        perturbed_guidance_config=LayerSkipConfig(indices=[0], fqn="mid_block.attentions.0.transformer_blocks",
                                                  skip_attention=False, skip_attention_scores=True, skip_ff=False),
    )
    components = {k: v for k, v in pipe.components.items() if k in ("unet", "vae", "text_encoder", "text_encoder_2",
                                                                    "tokenizer", "tokenizer_2", "scheduler")}
    modular.update_components(guider=guider, **components)
    modular.set_progress_bar_config(disable=True)

    def run(steps, height, width, on_step):
        modular(prompt=settings.prompt, num_inference_steps=steps, height=height, width=width,
                num_images_per_prompt=settings.batch, generator=torch.Generator(device="cpu").manual_seed(settings.seed),
                output="latents")
    return bench.Runner(MODULAR, "peer", 3, run)


def _tiny_sdxl(device: str, dtype: str):
    """The test suite's tiny SDXL-shaped pipeline (two text encoders, added conditions) for the dry run."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**bench_models.tiny_sdxl_components(), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, getattr(torch, dtype))


@contextlib.contextmanager
def no_decode(vae) -> None:
    """The VAE decode returns zeros of the image's shape: per-step times do not include it, and at
    1536 px x 4 images it would cost memory and minutes for nothing measured here."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    from attnguide.engine import instance_patch

    factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def decode(z, return_dict=True, generator=None):
        image = torch.zeros(z.shape[0], 3, z.shape[2] * factor, z.shape[3] * factor, device=z.device, dtype=z.dtype)
        return DecoderOutput(sample=image) if return_dict else (image,)

    with instance_patch(vae, "decode", decode):
        yield


def measure(pipe, runner, steps: int, height: int, width: int, clock: Clock, calls_per_step: int | None) -> dict:
    """One timed call: step times (ms) and peak memory (MiB)."""
    starts, unet_ends, ends = [], [], []
    pre = pipe.unet.register_forward_pre_hook(lambda *_: starts.append(clock.mark()))
    post = pipe.unet.register_forward_hook(lambda *_: unet_ends.append(clock.mark()))
    if clock.cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    try:
        t0 = time.perf_counter()
        runner.run(steps, height, width, lambda i: ends.append(clock.mark()))
        clock.sync()
        wall = time.perf_counter() - t0
    finally:
        pre.remove()
        post.remove()
    if calls_per_step is None:  # one U-Net call per step, a callback at its end
        if len(starts) != steps or len(ends) != steps:
            raise RuntimeError(f"{runner.name}: expected {steps} U-Net calls and step ends, saw {len(starts)} and {len(ends)}")
        step_ms = [clock.ms(s, e) for s, e in zip(starts, ends)]
        unet_ms = [clock.ms(s, u) for s, u in zip(starts, unet_ends)]
    else:  # several U-Net calls per step, no callback: first call to last call, per step
        step_ms = [clock.ms(starts[0], unet_ends[-1]) / steps]
        unet_ms = [sum(clock.ms(s, u) for s, u in zip(starts, unet_ends)) / steps]
    out = {"step_ms": step_ms, "unet_ms": unet_ms, "wall_s": wall, "unet_calls_per_step": len(starts) / steps}
    if clock.cuda:
        peak = torch.cuda.max_memory_allocated()
        out.update(peak_mb=peak / 2**20, delta_mb=(peak - base) / 2**20)
    return out


def _table(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# GPU benchmark: {meta['device_name']}, {meta['dtype']}, {meta['steps']} steps x {meta['repeats']} repeats "
             f"(warm-up {meta['warmup']}), torch {meta['torch']}, diffusers {meta['diffusers']}", ""]
    for point in report["points"]:
        lines.append(f"## {point['model']} {point['size']}x{point['size']}, batch {point['batch']} — {point['status']}")
        lines.append("")
        lines.append("| configuration | U-Net imgs/step | step ms | step ×cfg | U-Net ms | peak MiB | Δ MiB | Δ ×cfg | note |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        ref = point["configs"].get("cfg", {})
        for name, c in point["configs"].items():
            def ratio(key):
                a, b = c.get(key), ref.get(key)
                return f"{a / b:.3f}" if a and b else "-"
            fmt = lambda v, spec: "-" if v is None else format(v, spec)
            lines.append(f"| {name} | {c.get('unet_images_per_step', '-')} | {fmt(c.get('step_ms_median'), '.2f')} | "
                         f"{ratio('step_ms_median')} | {fmt(c.get('unet_ms_median'), '.2f')} | {fmt(c.get('peak_mb'), '.0f')} | "
                         f"{fmt(c.get('delta_mb'), '.0f')} | {ratio('delta_mb')} | {c.get('status', '')} |")
        if point.get("profile"):
            lines.append("")
            lines.append("Attention per step (whole batch) on this device: SDPA calls / fused SDPA kernels / SDPA math-path "
                         "softmaxes / explicit softmaxes in the U-Net; U-Net GFLOP per image (FlopCounterMode):")
            lines.append("")
            lines.append("| method | U-Net attention | recording taps | U-Net GFLOP/image | ×cfg |")
            lines.append("|---|---|---|---:|---:|")
            for name, p in point["profile"].items():
                cell = lambda s: f"{s['sdpa_calls']} / {s['sdpa_fused_kernels']} / {s['math_softmax']} / {s['explicit_softmax']}"
                lines.append(f"| {name} | {cell(p['unet'])} | {cell(p['record'])} | {p['unet_gflop']:.2f} | {p['unet_x_cfg']:.4f} |")
        lines.append("")
    if report.get("skipped"):
        lines.append("Skipped: " + "; ".join(report["skipped"]))
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path) -> None:
    report["meta"]["elapsed_s"] = round(_elapsed(), 1)
    bench.write_json(report, out / "gpu_bench.json")
    tmp = out / ".gpu_bench.md.tmp"
    tmp.write_text(_table(report))
    os.replace(tmp, out / "gpu_bench.md")


def profile(pipe, methods, latent, tokens, batch) -> dict:
    """Attention kernels and U-Net FLOPs of one step per method on the pipeline's own U-Net and device."""
    rows = {}
    for m in methods:
        c = bench.count_step(pipe.unet, m, latent, tokens, batch=batch)
        rows[m] = {"unet": c.op_summary(["unet"]), "record": c.op_summary(["record"]),
                   "unet_gflop": (c.flops["unet"] + c.flops["identity"]) / batch / 1e9}
    for r in rows.values():
        r["unet_x_cfg"] = r["unet_gflop"] / rows["cfg"]["unet_gflop"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps: checks the script end to end")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", 400)),
                    help="seconds from the start of this script after which nothing new is started")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--points", default=None, help="comma list of model:size:batch (default: the full plan)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        print("no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    device, dtype = ("cuda", "float16") if cuda else ("cpu", "float32")
    steps, repeats, warmup = (2, 1, 1) if args.dry_run else (args.steps, args.repeats, args.warmup)
    plan = DRY_PLAN if args.dry_run else PLAN
    if args.points:
        plan = [(m, int(s), int(b)) for m, s, b in (p.split(":") for p in args.points.split(","))]
    import diffusers

    report = {"meta": {"device": device, "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                       "dtype": dtype, "steps": steps, "repeats": repeats, "warmup": warmup, "budget_s": args.budget_s,
                       "torch": torch.__version__, "diffusers": diffusers.__version__, "pag_layers": "mid",
                       "guidance_scale": 7.5, "pag_scale": 3.0, "time": datetime.datetime.now().isoformat(timespec="seconds")},
              "points": [], "skipped": []}
    clock = Clock(cuda)
    # Seconds per (pixel x image) of the costliest configuration's warm-up + timed calls, per model, and the side it was
    # measured at; a larger side scales it by its pixel ratio too (attention grows with pixels squared): conservative.
    cost_per_pixel: dict[str, float] = {}
    measured_at: dict[str, int] = {}

    def estimate(model: str, size: int, batch: int) -> float:
        per = cost_per_pixel.get(model, 0.0) * size * size * batch
        return per * max(1.0, (size / measured_at.get(model, size)) ** 2)

    pipes: dict[str, object] = {}
    save(report, args.out)
    for model, size, batch in plan:
        left = args.budget_s - _elapsed()
        configs = list(bench.METHOD_NAMES) + list(bench.PEER_NAMES) + [MODULAR]
        needed = estimate(model, size, batch) * len(configs)
        label = f"{model} {size}px batch {batch}"
        if left <= 0 or needed > left:
            report["skipped"].append(f"{label} (estimated {needed:.0f} s, {max(left, 0):.0f} s left)")
            save(report, args.out)
            continue
        point = {"model": model, "size": size, "batch": batch, "status": "running", "configs": {}}
        report["points"].append(point)
        try:
            if model not in pipes:
                for other in list(pipes):  # one model in memory at a time
                    del pipes[other]
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                with torch.device(device) if cuda else contextlib.nullcontext():
                    pipes[model] = _tiny_sdxl(device, dtype) if model == "tiny-sdxl" else bench.build_pipeline(model, device, dtype)
            pipe = pipes[model]
            settings = bench.RunSettings(batch=batch)
            runners = bench.make_runners(pipe, settings, bench.METHOD_NAMES, bench.PEER_NAMES)
            modular_skipped = None
            try:
                runners.append(_modular_runner(pipe, settings, device))
            except Exception as exc:  # noqa: BLE001 - a peer that does not run is reported, not fatal
                modular_skipped = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            with torch.no_grad(), no_decode(pipe.vae):
                for runner in runners:
                    left = args.budget_s - _elapsed()
                    per_config = estimate(model, size, batch)
                    entry = point["configs"].setdefault(runner.name, {})
                    entry.update(kind=runner.kind, unet_images_per_step=runner.branches * batch)
                    if left <= 0 or per_config > left:
                        entry["status"] = "skipped: time budget"
                        save(report, args.out)
                        continue
                    t0 = time.perf_counter()
                    multi = 3 if runner.name == MODULAR else None
                    try:
                        for _ in range(warmup):
                            measure(pipe, runner, 2 if multi else 1, size, size, clock, multi)
                        runs = [measure(pipe, runner, steps, size, size, clock, multi) for _ in range(repeats)]
                    except torch.cuda.OutOfMemoryError:
                        entry["status"] = "out of memory"
                        gc.collect()
                        torch.cuda.empty_cache()
                        save(report, args.out)
                        continue
                    except Exception as exc:  # noqa: BLE001
                        entry["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                        entry["traceback"] = traceback.format_exc()[-2000:]
                        save(report, args.out)
                        continue
                    seconds = time.perf_counter() - t0
                    if size >= measured_at.get(model, 0):
                        if size > measured_at.get(model, 0):
                            cost_per_pixel[model] = 0.0
                        measured_at[model] = size
                        cost_per_pixel[model] = max(cost_per_pixel.get(model, 0.0), seconds / (size * size * batch))
                    steps_ms = [s for r in runs for s in r["step_ms"]]
                    entry.update(status="ok", unet_calls_per_step=runs[-1]["unet_calls_per_step"], step_ms=steps_ms, step_ms_median=statistics.median(steps_ms),
                                 unet_ms_median=statistics.median([s for r in runs for s in r["unet_ms"]]),
                                 peak_mb=max((r.get("peak_mb") or 0) for r in runs) or None,
                                 delta_mb=max((r.get("delta_mb") or 0) for r in runs) or None, seconds=seconds)
                    save(report, args.out)
                if modular_skipped:
                    point["configs"][MODULAR] = {"kind": "peer", "status": modular_skipped}
                if ((model, size, batch) == plan[0] or (args.dry_run and batch == 1)) and args.budget_s > _elapsed():
                    latent = size // int(pipe.vae_scale_factor)
                    point["profile"] = profile(pipe, bench.METHOD_NAMES, (latent, latent),
                                               int(pipe.tokenizer.model_max_length), batch)
            point["status"] = "done"
        except Exception as exc:  # noqa: BLE001 - keep what the other points measured
            point["status"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            point["traceback"] = traceback.format_exc()[-3000:]
        save(report, args.out)
    print(_table(report))
    print(f"elapsed {_elapsed():.0f} s; wrote {args.out / 'gpu_bench.json'} and {args.out / 'gpu_bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
