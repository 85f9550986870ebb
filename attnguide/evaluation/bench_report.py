"""The benchmark's reports: the ratios to ``cfg`` with the overhead targets and noise controls, markdown
tables of the timing and of the cost counts, and the atomic JSON writer."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .bench_costs import EXTRA_PHASES

# (label, numerator, denominator, quantity, limit): the targets this benchmark is read against.
BARS: tuple[tuple[str, str, str, str, float], ...] = (
    ("scfg / cfg, time per step", "scfg", "cfg", "step", 1.05),
    ("pag / cfg, time per step", "pag", "cfg", "step", 1.02),
    ("cfg+pag / cfg, time per step", "cfg+pag", "cfg", "step", 1.50),
    ("scfg+pag / cfg+pag, time per step", "scfg+pag", "cfg+pag", "step", 1.05),
    ("scfg / cfg, peak memory while denoising (delta)", "scfg", "cfg", "mem_delta", 1.10),
    ("scfg / cfg, peak memory while denoising (total)", "scfg", "cfg", "mem_total", 1.10),
    ("cfg+pag / diffusers-cfg+pag, time per step", "cfg+pag", "diffusers-cfg+pag", "step", 1.00),
)
# Same U-Net work on both sides: their ratio shows how much noise the measurement has.
CONTROLS: tuple[tuple[str, str, str], ...] = (
    ("cfg / diffusers-cfg, time per step", "cfg", "diffusers-cfg"),
    ("pag / diffusers-pag, time per step", "pag", "diffusers-pag"),
    ("unfused-scfg / scfg, time per step", "unfused-scfg", "scfg"),
)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def summarise(configs: dict[str, dict]) -> tuple[dict, list, list]:
    ref = configs.get("cfg", {})

    def value(name: str, quantity: str) -> float | None:
        c = configs.get(name)
        if c is None:
            return None
        key = {"step": "step_ms", "cpu_step": "cpu_step_ms", "image": "image_s", "mem_delta": "denoise_delta_mb", "mem_total": "denoise_peak_mb",
               "run_mem_delta": "run_delta_mb"}[quantity]
        source = c if quantity in ("step", "cpu_step", "image") else c.get("memory") or {}
        return source.get(key)

    ratios = {
        name: {q: _ratio(value(name, q), value("cfg", q))
               for q in ("step", "cpu_step", "image", "mem_delta", "mem_total", "run_mem_delta")}
        for name in configs
    } if ref else {}
    bars = []
    for label, num, den, quantity, limit in BARS:
        r = _ratio(value(num, quantity), value(den, quantity))
        r_cpu = _ratio(value(num, "cpu_step"), value(den, "cpu_step")) if quantity == "step" else None
        bars.append({"bar": label, "ratio": r, "ratio_cpu_time": r_cpu, "limit": limit, "met": None if r is None else r <= limit})
    controls = [{"control": label, "ratio": _ratio(value(a, "step"), value(b, "step")),
                 "ratio_cpu_time": _ratio(value(a, "cpu_step"), value(b, "cpu_step"))} for label, a, b in CONTROLS]
    return ratios, bars, controls

def write_json(data: dict, path: str | Path) -> None:
    """Write ``data`` as JSON atomically (a temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict) -> str:
    """Markdown tables of the absolute numbers and the ratios to ``cfg``, the bars and controls."""
    meta = report["meta"]
    lines = []
    for res in report["results"]:
        lines.append(f"### {meta['model']} {res['height']}x{res['width']}, {meta['steps']} steps, batch {meta['batch']}, "
                     f"{meta['dtype']} on {meta['device']} (repeats {meta['repeats']}, warm-up {meta['warmup']})")
        lines.append("")
        lines.append("| configuration | U-Net imgs/step | step ms | step ×cfg | CPU-time ×cfg | U-Net ms | rest ms | image s | "
                     "image ×cfg | peak MiB (denoise) | Δ MiB (denoise) | Δ ×cfg | Δ MiB (whole call) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, c in res["configs"].items():
            r = res["ratios"].get(name, {})
            m = c.get("memory") or {}
            lines.append(
                f"| {name} | {c['unet_images_per_step']} | {_fmt(c.get('step_ms'), '.1f')} | {_fmt(r.get('step'), '.3f')} | "
                f"{_fmt(r.get('cpu_step'), '.3f')} | {_fmt(c.get('unet_ms'), '.1f')} | {_fmt(c.get('rest_ms'), '.2f')} | "
                f"{_fmt(c.get('image_s'), '.3f')} | {_fmt(r.get('image'), '.3f')} | {_fmt(m.get('denoise_peak_mb'), '.0f')} | "
                f"{_fmt(m.get('denoise_delta_mb'), '.1f')} | {_fmt(r.get('mem_delta'), '.3f')} | {_fmt(m.get('run_delta_mb'), '.1f')} |"
            )
        lines.append("")
        lines.append("Overhead targets: each ratio below (the first method's cost / the second's, measured in this run) "
                     "should stay at or under its target; 'over' means this run measured more than the target (the "
                     "controls show how much timing noise this machine has).")
        lines.append("")
        lines.append("| overhead target | measured ratio | (CPU time) | target | result |")
        lines.append("|---|---:|---:|---:|:---:|")
        for b in res["bars"]:
            if b["met"] is None:
                met = "not measured"
            elif b["met"]:
                met = "within target"
            else:
                met = f"over by {100 * (b['ratio'] / b['limit'] - 1):.0f}%"
            lines.append(f"| {b['bar']} | {_fmt(b['ratio'], '.3f')} | {_fmt(b['ratio_cpu_time'], '.3f')} | ≤ {b['limit']:.2f} | {met} |")
        for c in res["controls"]:
            lines.append(f"| control: {c['control']} | {_fmt(c['ratio'], '.3f')} | {_fmt(c['ratio_cpu_time'], '.3f')} | | |")
        lines.append("")
    return "\n".join(lines)


def _g(flops: int) -> str:
    if flops == 0:
        return "0"
    return f"{flops / 1e9:,.3f}" if flops >= 1e7 else f"{flops / 1e9:.6f}"


def format_costs(report: dict) -> str:
    """Markdown tables of ``count_costs``: evaluations and FLOPs per image with ratios to cfg; attention kernels."""
    lines = []
    meta = report["meta"]
    for model, m in report["models"].items():
        lines.append(f"#### {model} {m['height']}x{m['width']} (latent {m['latent'][0]}x{m['latent'][1]}, {m['tokens']} text tokens, "
                     f"{m['attention_layers']} attention layers), batch {meta['batch']}, counted on {meta['device']}")
        lines.append("")
        lines.append("| method | U-Net evals / image / step | U-Net evals / image ({} steps) | ×cfg | U-Net GFLOP / image / step | "
                     "U-Net ×cfg | attnguide extra GFLOP (record + segment + rate + combine) | total ×cfg |".format(
                         next(iter(m["methods"].values()))["steps"]))
        lines.append("|---|---:|---:|---:|---:|---:|---|---:|")
        for name, c in m["methods"].items():
            e = c["extra_flops_per_image"]
            extra = f"{_g(sum(e.values()))} ({' + '.join(_g(e[p]) for p in EXTRA_PHASES)})"
            lines.append(f"| {name} | {c['unet_evals_per_image_per_step']} | {c['unet_evals_per_image']} | "
                         f"{c['unet_evals_x_cfg']:.4f} | {_g(c['unet_flops_per_image'])} | {c['unet_flops_x_cfg']:.4f} | "
                         f"{extra} | {c['total_flops_x_cfg']:.4f} |")
        lines.append("")
        lines.append("Attention per step (whole batch): `scaled_dot_product_attention` calls / fused SDPA kernels / SDPA "
                     "math-path softmaxes / explicit softmaxes, inside the U-Net (taps' own layers included), in PAG's "
                     "identity rows, in S-CFG's recording taps and in the segmentation"
                     + (" (meta device: which SDPA kernel runs is not observable; count on cpu/cuda for that):"
                        if meta["device"] == "meta" else ":"))
        lines.append("")
        lines.append("| method | U-Net | identity rows | recording taps | segmentation | identity rows: matmuls, GFLOP |")
        lines.append("|---|---|---|---|---|---|")
        for name, c in m["methods"].items():
            a = c["attention"]
            if meta["device"] == "meta":  # meta tensors always take SDPA's math path: the kernel is not observable
                cell = lambda s: f"{s['sdpa_calls']} / n/a / n/a / {s['explicit_softmax']}"
            else:
                cell = lambda s: f"{s['sdpa_calls']} / {s['sdpa_fused_kernels']} / {s['math_softmax']} / {s['explicit_softmax']}"
            lines.append(f"| {name} | {cell(a['unet'])} | {cell(a['identity'])} | {cell(a['record'])} | {cell(a['segment'])} | "
                         f"{a['identity']['matmuls']}, {_g(c['identity_flops_per_image'])} |")
        lines.append("")
    return "\n".join(lines)
