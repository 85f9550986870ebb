"""Measuring: per-step and per-call timing of the runners (wall clock, CPU time, CUDA memory), and CPU
peak memory (RSS) of one call, in this process or in fresh child processes."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..transformer_attention import denoiser
from .bench_models import build_pipeline
from .bench_peers import BRANCHES, METHOD_NAMES, PEER_NAMES, Runner, RunSettings, make_runners


def _now(device: str) -> float:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def timed_run(pipe, runner: Runner, steps: int, height: int, width: int, device: str) -> tuple[list[float], float, dict]:
    """One call of ``runner``: (seconds per step, seconds for the call, extras). Extras hold each
    step's split into the U-Net call (``unet_s``, attention taps included) and the rest (``rest_s``:
    S-CFG's mask arithmetic, guidance, scheduler), the CPU seconds per step (``cpu_step_s``, process CPU time: less disturbed by other processes than
    the wall clock on a shared CPU; CPU devices only) and CUDA memory stats."""
    starts: list[float] = []
    unet_ends: list[float] = []
    ends: list[float] = []
    cpu_starts: list[float] = []
    cpu_ends: list[float] = []
    cuda = str(device).startswith("cuda")
    memory: dict[str, float] = {}
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        memory["baseline_mb"] = torch.cuda.memory_allocated() / 2**20

    def on_step(i: int) -> None:
        ends.append(_now(device))
        cpu_ends.append(time.process_time())
        if cuda and i == steps - 1:
            memory["denoise_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20

    # A step may call the denoiser twice (Flux's true CFG: the negative prompt's call); the step's
    # denoiser time runs from its first call's start to its last call's end.
    def on_unet(*_) -> None:
        if len(starts) == len(ends):
            cpu_starts.append(time.process_time())
            starts.append(_now(device))

    def on_unet_end(*_) -> None:
        if len(unet_ends) > len(ends):
            unet_ends[-1] = _now(device)
        else:
            unet_ends.append(_now(device))

    model = denoiser(pipe)
    handles = [model.register_forward_pre_hook(on_unet), model.register_forward_hook(on_unet_end)]
    try:
        t0 = _now(device)
        runner.run(steps, height, width, on_step)
        t1 = _now(device)
    finally:
        for handle in handles:
            handle.remove()
    if len(starts) != steps or len(ends) != steps:
        raise RuntimeError(f"{runner.name}: expected {steps} U-Net calls and step ends, saw {len(starts)} and {len(ends)}")
    extras: dict[str, Any] = {"unet_s": [u - s for s, u in zip(starts, unet_ends)],
                              "rest_s": [e - u for u, e in zip(unet_ends, ends)]}
    if cuda:
        memory["run_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        extras["cuda_memory"] = memory
    else:
        extras["cpu_step_s"] = [e - s for s, e in zip(cpu_starts, cpu_ends)]
    return [e - s for s, e in zip(starts, ends)], t1 - t0, extras


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _pin_malloc() -> None:
    """Pin glibc's mmap threshold (128 KiB) so freed tensors are returned to the OS at once and
    the RSS follows the live memory, instead of the heap keeping whatever the last run freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (also turns off the dynamic threshold)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def measure_cpu_memory(runner: Runner, steps: int, height: int, width: int, warmup: bool = True) -> dict:
    """Peak RSS of one call of ``runner`` in this process (MiB): the total and the increase over
    the RSS before the call, while denoising (at the last step) and for the whole call."""
    if warmup:
        runner.run(1, height, width, lambda i: None)
    gc.collect()
    baseline = _proc_status_kb("VmRSS")
    exact = _reset_peak_rss() and baseline is not None
    marks: dict[str, int] = {}

    def on_step(i: int) -> None:
        if i == steps - 1:
            marks["denoise"] = _proc_status_kb("VmHWM") or 0

    runner.run(steps, height, width, on_step)
    if exact:
        run_peak = _proc_status_kb("VmHWM") or 0
        method = "VmHWM after clear_refs"
    else:  # no /proc: the lifetime peak (an upper bound that may include model loading)
        scale = 1 if sys.platform == "darwin" else 1024
        run_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale // 1024
        marks["denoise"] = run_peak
        baseline = baseline or 0
        method = "ru_maxrss (lifetime peak)"
    mb = 1 / 1024
    return {
        "method": method,
        "baseline_mb": baseline * mb,
        "denoise_peak_mb": marks["denoise"] * mb,
        "run_peak_mb": run_peak * mb,
        "denoise_delta_mb": (marks["denoise"] - baseline) * mb,
        "run_delta_mb": (run_peak - baseline) * mb,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def memory_child() -> None:
    """Entry point of a memory-measuring child process: a JSON spec on stdin, one JSON line out."""
    spec = json.loads(sys.stdin.read())
    _pin_malloc()
    torch.set_num_threads(spec["threads"])
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    out: dict[str, Any] = {}
    pipe = build_pipeline(spec["model"], spec["device"], spec["dtype"], spec["model_path"])
    settings = RunSettings(**spec["settings"])
    methods = [c for c in spec["configs"] if c in METHOD_NAMES]
    peers = [c for c in spec["configs"] if c in PEER_NAMES]
    with torch.no_grad():
        for runner in make_runners(pipe, settings, methods, peers):
            out[runner.name] = measure_cpu_memory(runner, spec["steps"], spec["height"], spec["width"])
    print("BENCH-MEMORY " + json.dumps(out), flush=True)


def run_memory_children(groups: list[list[str]], spec: dict, progress: bool) -> dict[str, dict]:
    """Measure CPU memory of each group of configurations in its own fresh child process."""
    from tqdm.auto import tqdm

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), MALLOC_TRIM_THRESHOLD_=str(128 * 1024),
               PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    results: dict[str, dict] = {}
    for group in tqdm(groups, desc=f"memory {spec['height']}x{spec['width']}", disable=not progress):
        child = subprocess.run(
            [sys.executable, "-c", "from attnguide.evaluation.bench_timing import memory_child; memory_child()"],
            input=json.dumps(dict(spec, configs=group)), capture_output=True, text=True, env=env,
        )
        line = next((lay for lay in child.stdout.splitlines() if lay.startswith("BENCH-MEMORY ")), None)
        if child.returncode != 0 or line is None:
            tail = "\n".join((child.stderr or child.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"memory measurement of {group} failed (exit {child.returncode}):\n{tail}")
        results.update(json.loads(line[len("BENCH-MEMORY "):]))
    return results


# ---------------------------------------------------------------------------------------------
# Timing every configuration at one resolution


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def new_timings(configs: Sequence[str], batch: int) -> dict[str, dict]:
    """Empty per-configuration records for ``time_runners``."""
    return {name: {"kind": "attnguide" if name in METHOD_NAMES else "peer", "branches": BRANCHES[name],
                   "unet_images_per_step": BRANCHES[name] * batch, "step_s": [], "unet_s": [], "rest_s": [],
                   "cpu_step_s": [], "run_s": [], "cuda_memory": []} for name in configs}


def time_runners(pipe, runners: list[Runner], per: dict[str, dict], *, steps: int, height: int, width: int,
                 warmup: int, repeats: int, device: str, progress: bool, desc: str) -> None:
    """Warm every runner up (one step each), then time ``repeats`` calls of each, round-robin with the
    order rotating each repeat; append the measurements to ``per`` (from ``new_timings``)."""
    from tqdm.auto import tqdm

    total = len(runners) * (warmup + repeats)
    bar = tqdm(total=total, desc=desc, disable=not progress or not runners)
    for _ in range(warmup):
        for r in runners:
            bar.set_postfix_str(f"warm-up {r.name}")
            timed_run(pipe, r, 1, height, width, device)  # every shape of a step, once
            bar.update()
    for rep in range(repeats):
        shift = rep % len(runners)
        for r in runners[shift:] + runners[:shift]:  # rotate: no configuration always runs first
            bar.set_postfix_str(r.name)
            step_s, run_s, extras = timed_run(pipe, r, steps, height, width, device)
            c = per[r.name]
            c["step_s"] += step_s
            c["cpu_step_s"] += extras.get("cpu_step_s", [])
            c["unet_s"] += extras["unet_s"]
            c["rest_s"] += extras["rest_s"]
            c["run_s"].append(run_s)
            if "cuda_memory" in extras:
                c["cuda_memory"].append(extras["cuda_memory"])
            bar.update()
    bar.close()


def summarise_timings(per: dict[str, dict], batch: int, cuda: bool) -> None:
    """Add the medians (ms per step, s per image) and the CUDA peak memory to each record of ``per``."""
    for c in per.values():
        if c["step_s"]:
            c["step_ms"] = 1000 * median(c["step_s"])
            c["cpu_step_ms"] = 1000 * median(c["cpu_step_s"]) if c["cpu_step_s"] else None
            c["unet_ms"] = 1000 * median(c["unet_s"])
            c["rest_ms"] = 1000 * median(c["rest_s"])
            c["image_s"] = median(c["run_s"]) / batch
        if cuda and c["cuda_memory"]:
            peaks = c.pop("cuda_memory")
            base = min(m["baseline_mb"] for m in peaks)
            dp = max(m["denoise_peak_mb"] for m in peaks)
            rp = max(m["run_peak_mb"] for m in peaks)
            c["memory"] = {"method": "torch.cuda.max_memory_allocated", "baseline_mb": base,
                           "denoise_peak_mb": dp, "run_peak_mb": rp, "denoise_delta_mb": dp - base,
                           "run_delta_mb": rp - base}
        else:
            c.pop("cuda_memory", None)
