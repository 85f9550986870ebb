"""Speed and memory benchmark of attnguide's guidance methods against diffusers' own pipelines.

For one model, in one run, it measures for the methods ``none, cfg, pag, cfg+pag, scfg, scfg+pag``
and for four peers on the same model, seed, steps and resolution:

- ``diffusers-cfg``: diffusers' ``StableDiffusionPipeline`` (or the SDXL one) with CFG;
- ``diffusers-pag`` / ``diffusers-cfg+pag``: diffusers' ``StableDiffusionPAGPipeline`` (or the SDXL
  one) built from the same components with ``pag_applied_layers="mid"``, without / with CFG;
- ``unfused-scfg``: attnguide's S-CFG while every other attention layer of the U-Net computes an
  explicit softmax map and keeps its head-averaged copy (``unfused_attention``), which is the cost
  model of the S-CFG reference implementation (its ``AttentionStore``).

Measured quantities:

time per step
    From the start of the step's U-Net call (a forward pre-hook) to the end of the step (the
    sampler's callback, after guidance and the scheduler step): U-Net + mask arithmetic + guidance
    + scheduler. The median over every step of every repeat. Also split into the U-Net call
    (attention taps included) and the rest of the step (S-CFG's mask arithmetic, guidance,
    scheduler), and, on CPU, measured in process CPU time as well as wall-clock time.
end-to-end time per image
    The whole call (text encoding, sampling, VAE decode, post-processing) divided by the batch
    size; the median over repeats.
peak memory
    CUDA: ``torch.cuda.max_memory_allocated`` after a reset, in the benchmark process. CPU: the
    peak resident set size (``VmHWM``) of a fresh child process, reset (``/proc/self/clear_refs``)
    right before the measured call, with glibc's mmap threshold pinned so that freed tensors
    leave the RSS; reported as the process total and as the increase over the RSS before the
    call ("delta"), both during denoising (read at the last step, before the VAE decode) and
    for the whole call.

Every configuration gets warm-up calls first (one step each: every tensor shape of a step); timed
calls are interleaved round-robin (the order rotates each repeat) so that a changing background
load hits every configuration alike. Peak memory does not grow with the step count (nothing
accumulates across steps), so the CPU children measure a one-step call. Ratios are to attnguide's
``cfg`` measured in the same run.

Tiny random transformer pipelines (``tiny-sd3``, ``tiny-pixart-sigma``, ``tiny-hunyuan-dit``,
``tiny-sana``, ``tiny-flux``) run the same way against the peers that exist for them (``peers_for``):
diffusers' plain pipeline and its PAG class where diffusers has one.

Command line: ``attnguide bench --model tiny`` (see ``attnguide bench --help``), or
``python benchmarks/run_bench.py ...``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
from pathlib import Path
from typing import Iterator, Sequence

import click
import torch

from ..guidance import DEFAULTS
from .bench_costs import COUNT_MODELS, CostCounter, attention_layer_count, count_costs, count_step, counting_unet
from .bench_models import DTYPES, MODELS, SD_TOKENS, UNET_CONFIGS, build_pipeline, config_geometry, pipeline_geometry, resolve_size, transformer_family
from .bench_peers import (
    BRANCHES,
    DEFAULT_PROMPT,
    METHOD_NAMES,
    PEER_NAMES,
    AttentionMapStore,
    ExplicitAttnProcessor,
    Runner,
    RunSettings,
    make_runners,
    peers_for,
    unfused_attention,
)
from .bench_report import BARS, CONTROLS, format_costs, format_report, summarise, write_json
from .bench_timing import measure_cpu_memory, new_timings, run_memory_children, summarise_timings, time_runners, timed_run

# The benchmark's public names, re-exported here from the modules that define them.
__all__ = [
    "BARS", "BRANCHES", "CONTROLS", "COUNT_MODELS", "DEFAULT_PROMPT", "DTYPES", "MEMORY_MODES", "METHOD_NAMES", "MODELS",
    "PEER_NAMES", "SD_TOKENS", "UNET_CONFIGS", "AttentionMapStore", "CostCounter", "ExplicitAttnProcessor", "RunSettings",
    "Runner", "attention_layer_count", "bench", "build_pipeline", "count_costs", "count_step", "counting_unet",
    "format_costs", "format_report", "make_runners", "measure_cpu_memory", "run_benchmark", "timed_run",
    "unfused_attention", "write_json",
]

MEMORY_MODES = ("fresh", "shared", "inprocess", "off")


# ---------------------------------------------------------------------------------------------
# The benchmark


def _sizes(heights: Sequence[int] | None, widths: Sequence[int] | None) -> list[tuple[int | None, int | None]]:
    heights, widths = list(heights or []), list(widths or [])
    if not heights and not widths:
        return [(None, None)]
    if not heights or not widths:
        given, missing = ("height", "width") if heights else ("width", "height")
        raise ValueError(f"{missing}: give it too when {given} is given (one value, or one per {given})")
    if len(heights) != len(widths):
        if len(heights) == 1:
            heights = heights * len(widths)
        elif len(widths) == 1:
            widths = widths * len(heights)
        else:
            raise ValueError(f"height/width: give one value or the same number of each, got {len(heights)} heights and {len(widths)} widths")
    return list(zip(heights, widths))


def _check_args(model: str, steps: int, batch: int, repeats: int, warmup: int, dtype: str, device: str,
                methods: Sequence[str], peers: bool | Sequence[str], memory: str) -> tuple[list[str], list[str]]:
    """Validate ``run_benchmark``'s arguments; return (the methods, cfg included, the peers)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    for name, value, low in (("steps", steps, 1), ("batch", batch, 1), ("repeats", repeats, 0), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad:
        raise ValueError(f"methods: unknown {bad}; choose from {', '.join(METHOD_NAMES)}")
    methods = [m for m in METHOD_NAMES if m in set(methods) | {"cfg"}]
    peer_list = list(PEER_NAMES) if peers is True else [] if peers is False else list(peers)
    bad = [p for p in peer_list if p not in PEER_NAMES]
    if bad:
        raise ValueError(f"peers: unknown {bad}; choose from {', '.join(PEER_NAMES)}")
    if repeats == 0 and (memory in ("off", "inprocess") or str(device).startswith("cuda")):
        raise ValueError("repeats: 0 (memory only) needs a CPU device and memory 'fresh' or 'shared'")
    return methods, peer_list


def _child_memory(model: str, model_path, pipe, sizes: list, configs: list[str], spec: dict, memory: str,
                  device: str, progress: bool) -> tuple[list[tuple[int, int]], dict]:
    """CPU peak memory of every configuration at every size in child processes: (resolved sizes, results per size)."""
    geometry = pipeline_geometry(pipe, model) if pipe is not None else config_geometry(model, model_path)
    resolved = [resolve_size(size, geometry, model, device) for size in sizes]
    groups = [[c] for c in configs] if memory == "fresh" else [configs]
    results = {}
    for (h, w), size in zip(resolved, sizes):
        results[size] = run_memory_children(groups, dict(spec, height=h, width=w), progress)
    return resolved, results


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' per-call notices would drown the progress bar."""
    from diffusers.utils import logging as dlogging

    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(verbosity)


def _measure_size(pipe, runners: list[Runner], configs: list[str], size, h: int, w: int, child_results: dict, *,
                  model: str, steps: int, batch: int, warmup: int, repeats: int, memory: str, device: str,
                  progress: bool) -> dict:
    """The timing (and in-process or children's memory) of every configuration at one resolution, with the ratios."""
    cuda = str(device).startswith("cuda")
    per = new_timings(configs, batch)
    time_runners(pipe, runners, per, steps=steps, height=h, width=w, warmup=warmup, repeats=repeats, device=device,
                 progress=progress, desc=f"{model} {h}x{w}")
    if memory == "inprocess" and not cuda:  # approximate: the heap keeps what earlier runs freed
        from tqdm.auto import tqdm

        for r in tqdm(runners, desc="memory (in process)", disable=not progress):
            per[r.name]["memory"] = measure_cpu_memory(r, 1, h, w)
    summarise_timings(per, batch, cuda)
    for name, c in per.items():
        if size in child_results and name in child_results[size]:
            c["memory"] = dict(child_results[size][name], process="fresh" if memory == "fresh" else "shared")
    ratios, bars, controls = summarise(per)
    return {"height": h, "width": w, "configs": per, "ratios": ratios, "bars": bars, "controls": controls}


def _meta(model: str, model_path, device: str, dtype: str, steps: int, batch: int, repeats: int, warmup: int,
          memory: str, seed: int, guidance_scale: float, pag_scale: float, prompt: str, threads: int) -> dict:
    """The report's ``meta``: the run's settings and the machine."""
    import diffusers

    cuda = str(device).startswith("cuda")
    return {
        "model": model, "model_path": str(model_path) if model_path else None, "device": device, "dtype": dtype,
        "steps": steps, "batch": batch, "repeats": repeats, "warmup": warmup, "memory": memory,
        "memory_steps": 1 if memory != "off" and not cuda else steps, "seed": seed,
        "guidance_scale": guidance_scale, "pag_scale": pag_scale, "pag_layers": "mid", "prompt": prompt,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": threads,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda_device": torch.cuda.get_device_name(device) if cuda else None,
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def run_benchmark(
    model: str = "tiny",
    *,
    steps: int = 3,
    batch: int = 1,
    heights: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    methods: Sequence[str] = METHOD_NAMES,
    peers: bool | Sequence[str] = True,
    memory: str = "fresh",
    seed: int = 0,
    guidance_scale: float = DEFAULTS["guidance_scale"],
    pag_scale: float = DEFAULTS["pag_scale"],
    prompt: str = DEFAULT_PROMPT,
    model_path: str | Path | None = None,
    json_path: str | Path | None = None,
    pipe=None,
    progress: bool = True,
) -> dict:
    """Benchmark attnguide's methods and the peers on one model; return (and optionally write) the results.

    Args:
        model: ``tiny``, ``builtin``, ``sd15`` or ``sdxl`` (see ``build_pipeline``); ``model_path``
            overrides the built-in model's folder. ``pipe`` skips building (then ``memory`` cannot
            be ``fresh``/``shared`` unless ``model`` names how children rebuild it).
        steps: denoising steps per timed call; batch: images per call.
        heights / widths: resolutions to sweep (paired; one value broadcasts); default: the native size (256 for sd15/sdxl on CPU).
        repeats: timed calls per configuration (0: memory only); warmup: untimed calls before them.
        methods: attnguide methods to time (``cfg`` is always added: it is the reference).
        peers: ``True`` for all of ``PEER_NAMES``, ``False`` for none, or a list of names.
        memory: ``fresh`` (CPU: one fresh child process per configuration), ``shared`` (one child
            for all), ``inprocess`` (this process, after the timing; approximate, since the heap
            keeps memory freed by earlier runs), ``off``. On CUDA memory is
            always read in this process from the timed calls.
        json_path: where to write the results as JSON (atomically).

    Returns a dict with ``meta`` and, per resolution, ``configs`` (absolute numbers), ``ratios``
    (to ``cfg``), ``bars`` and ``controls``.
    """
    methods, peer_list = _check_args(model, steps, batch, repeats, warmup, dtype, device, methods, peers, memory)
    unavailable = [p for p in peer_list if p not in peers_for(model)]  # e.g. no diffusers PAG class for Flux
    peer_list = [p for p in peer_list if p not in unavailable]
    sizes = _sizes(heights, widths)
    cuda = str(device).startswith("cuda")
    threads = torch.get_num_threads()
    family = transformer_family(model)
    settings = RunSettings(prompt=prompt, batch=batch, seed=seed, guidance_scale=guidance_scale, pag_scale=pag_scale,
                           call_kwargs=dict(family.call_kwargs) if family else {})
    configs_all = methods + peer_list

    # Memory children first, before this process holds a (possibly huge) model of its own.
    child_results: dict[tuple[int | None, int | None], dict] = {}
    if not cuda and memory in ("fresh", "shared"):
        spec = dict(model=model, device=device, dtype=dtype, model_path=str(model_path) if model_path else None,
                    settings=settings.__dict__, steps=1, threads=threads)
        resolved, child_results = _child_memory(model, model_path, pipe, sizes, configs_all, spec, memory, device, progress)
    if repeats == 0:  # memory only: the children did everything
        sizes_resolved = resolved
    else:
        if pipe is None:
            pipe = build_pipeline(model, device, dtype, model_path)
        sizes_resolved = [resolve_size(size, pipeline_geometry(pipe, model), model, device) for size in sizes]

    results = []
    with _quiet_diffusers(), torch.no_grad():
        runners = make_runners(pipe, settings, methods, peer_list) if repeats else []
        for size, (h, w) in zip(sizes, sizes_resolved):
            results.append(_measure_size(pipe, runners, configs_all, size, h, w, child_results, model=model, steps=steps,
                                         batch=batch, warmup=warmup, repeats=repeats, memory=memory, device=device,
                                         progress=progress))
    report = {"meta": dict(_meta(model, model_path, device, dtype, steps, batch, repeats, warmup, memory, seed, guidance_scale,
                                 pag_scale, prompt, threads), peers_unavailable=unavailable),
              "results": results}
    if json_path is not None:
        write_json(report, json_path)
    return report


# ---------------------------------------------------------------------------------------------
# Command line


def _names(value: str, allowed: Sequence[str], param: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise click.BadParameter(f"unknown {bad or 'empty list'}; choose from {', '.join(allowed)}", param_hint=param)
    return names



def _count_only(count_models: str, heights, method_list: list[str], batch: int, count_device: str, dtype: str,
                model_path, json_path) -> None:
    """``--count-only``: print (and optionally write) the cost counts of ``count_models``."""
    models = _names(count_models, COUNT_MODELS, "--count-models")
    sizes = {m: heights[0] for m in models} if heights else None
    try:
        costs = count_costs(models, method_list, sizes=sizes, batch=batch, device=count_device, dtype=dtype,
                            model_path=model_path)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(format_costs(costs))
    if json_path:
        write_json(costs, json_path)
        click.echo(f"wrote {json_path}")


def _print_profile(report: dict, model: str, method_list: list[str], batch: int, device: str, dtype: str,
                   model_path, json_path) -> None:
    """``--profile``: the attention op profile per method at the benchmark's first resolution, added to the JSON."""
    res = report["results"][0]
    costs = count_costs([model], method_list, sizes={model: res["height"]}, batch=batch, device=device, dtype=dtype,
                        model_path=model_path)
    click.echo("### attention op profile and FLOPs per step\n")
    click.echo(format_costs(costs))
    report["profile"] = costs
    if json_path:
        write_json(report, json_path)


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", type=click.Choice(MODELS), default="tiny", help="tiny (smoke), builtin (trained), sd15 / sdxl (real architectures, random weights), "
                   "tiny-<family> (tiny random transformers: SD3, PixArt-Σ, HunyuanDiT, Sana, Flux).")
@click.option("--model-path", type=click.Path(exists=True, file_okay=False), default=None, help="Diffusers folder for --model builtin [default: the package's built-in model].")
@click.option("--steps", type=click.IntRange(1, 1000), default=3, help="Denoising steps per timed call.")
@click.option("--batch", type=click.IntRange(1, 64), default=1, help="Images per call.")
@click.option("--height", "heights", type=click.IntRange(8), multiple=True, help="Image height; repeat for a resolution sweep [default: native; 256 for sd15/sdxl on CPU].")
@click.option("--width", "widths", type=click.IntRange(8), multiple=True, help="Image width; repeat (paired with --height; one value broadcasts).")
@click.option("--repeats", type=click.IntRange(0, 100), default=3, help="Timed calls per configuration (0: memory only).")
@click.option("--warmup", type=click.IntRange(0, 10), default=1, help="Untimed calls per configuration first.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32")
@click.option("--device", default="cpu", help="torch device, e.g. cpu or cuda.")
@click.option("--methods", default=",".join(METHOD_NAMES), help="Comma list of attnguide methods (cfg is always included).")
@click.option("--peers/--no-peers", default=True, help=f"Also run the peers: {', '.join(PEER_NAMES)}.")
@click.option("--peer-list", default=None, help="Comma list of peers to run (implies --peers) [default: all].")
@click.option("--memory", type=click.Choice(MEMORY_MODES), default="fresh",
              help="CPU peak memory: one fresh child process per configuration, one shared child, this process, or off.")
@click.option("--seed", type=int, default=0)
@click.option("--guidance-scale", type=click.FloatRange(0, 100), default=DEFAULTS["guidance_scale"])
@click.option("--pag-scale", type=click.FloatRange(0, 100), default=DEFAULTS["pag_scale"])
@click.option("--prompt", default=DEFAULT_PROMPT)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results here as JSON.")
@click.option("--count-only", is_flag=True, help="No timing: count U-Net evaluations, FLOPs (FlopCounterMode) and attention kernels per step of --count-models on --count-device.")
@click.option("--count-models", default="builtin,sd15,sdxl", help=f"Comma list of models for --count-only ({', '.join(COUNT_MODELS)}), at their native size (or --height).")
@click.option("--count-device", default="meta", help="Device of --count-only: meta (any size in seconds; SDPA kernel choice not observable) or a real one.")
@click.option("--profile", is_flag=True, help="After timing, print the attention op profile per method (SDPA calls vs fused kernels vs explicit softmax, FLOPs) on --device.")
def bench(model, model_path, steps, batch, heights, widths, repeats, warmup, dtype, device, methods, peers, peer_list, memory,
          seed, guidance_scale, pag_scale, prompt, json_path, count_only, count_models, count_device, profile) -> None:
    """Time per step, time per image and peak memory of every guidance method and of diffusers' pipelines.

    \b
    Examples:
      attnguide bench --model tiny --steps 2 --repeats 3
      attnguide bench --model builtin --steps 3 --repeats 5 --json bench-builtin.json
      attnguide bench --model sd15 --height 256 --width 256 --steps 2 --repeats 1 --memory shared
      attnguide bench --model sdxl --device cuda --dtype float16 --steps 10 --height 1024 --height 768 --width 1024 --width 768
      attnguide bench --count-only                       # evaluations, FLOPs, attention kernels: builtin, sd15, sdxl
      attnguide bench --model tiny --profile             # timing, then the attention op profile per method

    On a CPU the SD 1.5 / SDXL architectures take seconds to minutes per step; keep steps, repeats
    and resolution small there. Ratios within one run are what to read on a loaded machine.
    """
    method_list = _names(methods, METHOD_NAMES, "--methods")
    peer_names: bool | list[str] = _names(peer_list, PEER_NAMES, "--peer-list") if peer_list else peers
    if count_only:
        _count_only(count_models, heights, method_list, batch, count_device, dtype, model_path, json_path)
        return
    try:
        report = run_benchmark(
            model, steps=steps, batch=batch, heights=heights, widths=widths, repeats=repeats, warmup=warmup, dtype=dtype,
            device=device, methods=method_list, peers=peer_names, memory=memory, seed=seed, guidance_scale=guidance_scale,
            pag_scale=pag_scale, prompt=prompt, model_path=model_path, json_path=json_path,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(format_report(report))
    if profile:
        _print_profile(report, model, method_list, batch, device, dtype, model_path, json_path)
    if json_path:
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    bench()
