"""Deterministic cost accounting (``attnguide bench --count-only`` and ``--profile``): U-Net evaluations,
FLOPs and attention kernels per step of every method, counted with ``FlopCounterMode`` and a dispatch
mode on one guided step (on the ``meta`` device: the architecture only, any size in seconds)."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .bench_models import SD_TOKENS, UNET_CONFIGS, config_geometry
from .bench_peers import METHOD_NAMES

COUNT_MODELS = ("tiny", "builtin", "sd15", "sdxl")
# Phases of one guided step. "unet" is the U-Net's own work (PAG's identity rows included, reported
# apart as "identity" too); the others are attnguide's extra arithmetic: the taps' recording of S-CFG's
# q/k and cross maps inside the U-Net call, the segmentation, the rate map and the guidance combine.
EXTRA_PHASES = ("record", "segment", "rate", "combine")
# The fused kernels scaled_dot_product_attention dispatches to (its math path shows up as _safe_softmax).
FUSED_SDPA_OPS = frozenset({
    "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_fused_attention_overrideable",
})
COUNTED_OPS = {"math_softmax": "aten._safe_softmax", "explicit_softmax": "aten._softmax"}


def _flop_mapping() -> dict:
    """FlopCounterMode's formulas plus the CPU flash kernel, which torch's registry lacks (it counted 0)."""
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_flash(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    cpu_flash._get_raw = True  # takes tensors, not shapes
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: cpu_flash} if op is not None else {}


class CostCounter:
    """FLOPs (``torch.utils.flop_counter.FlopCounterMode``, one per phase, nested: each phase is counted
    exclusive of the phases inside it) and op counts (a ``TorchDispatchMode``) of the code run inside
    ``phase(name)`` blocks; ``scaled_dot_product_attention`` calls are counted at the Python level too."""

    def __init__(self) -> None:
        from collections import Counter, defaultdict

        self.flops: dict[str, int] = defaultdict(int)
        self.ops: dict[str, Counter] = defaultdict(Counter)
        self.sdpa_calls: Counter = Counter()
        self.linear_rows: dict[str, list] = defaultdict(list)
        self._stack: list[list] = []  # [name, flops of nested phases]

    @property
    def current(self) -> str:
        return self._stack[-1][0] if self._stack else "other"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        from torch.utils.flop_counter import FlopCounterMode

        mode = FlopCounterMode(display=False, custom_mapping=_flop_mapping())
        entry = [name, 0]
        self._stack.append(entry)
        try:
            with mode:
                yield
        finally:
            self._stack.pop()
            total = mode.get_total_flops()
            self.flops[name] += total - entry[1]
            if self._stack:
                self._stack[-1][1] += total

    @contextlib.contextmanager
    def active(self) -> Iterator["CostCounter"]:
        """Count ops and SDPA calls; attribute the taps' recording and PAG's identity rows to their phases."""
        from torch.utils._python_dispatch import TorchDispatchMode

        from attnguide import attention

        counter = self

        class _Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops[counter.current][str(func.overloadpacket)] += 1
                return func(*args, **(kwargs or {}))

        sdpa = torch.nn.functional.scaled_dot_product_attention
        record = attention.GuidanceAttnProcessor.record_maps
        identity = attention.identity_attention

        def counted_sdpa(*args, **kwargs):
            counter.sdpa_calls[counter.current] += 1
            return sdpa(*args, **kwargs)

        def counted_record(tap, *args, **kwargs):
            with counter.phase("record"):
                return record(tap, *args, **kwargs)

        def counted_identity(*args, **kwargs):
            with counter.phase("identity"):
                return identity(*args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = counted_sdpa
        attention.GuidanceAttnProcessor.record_maps = counted_record
        attention.identity_attention = counted_identity
        try:
            with _Ops():
                yield self
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
            attention.GuidanceAttnProcessor.record_maps = record
            attention.identity_attention = identity

    def op_summary(self, phases: Sequence[str]) -> dict[str, int]:
        ops = {}
        for p in phases:
            for k, v in self.ops[p].items():
                ops[k] = ops.get(k, 0) + v
        fused = sum(v for k, v in ops.items() if k in FUSED_SDPA_OPS)
        return {"sdpa_calls": sum(self.sdpa_calls[p] for p in phases), "sdpa_fused_kernels": fused,
                **{name: ops.get(op, 0) for name, op in COUNTED_OPS.items()},
                "matmuls": sum(ops.get(k, 0) for k in ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"))}


def _step_inputs(unet, rows: int, latent_hw: tuple[int, int], tokens: int, seed: int = 0) -> dict:
    """Random U-Net inputs for ``rows`` batch rows (SD 1.x / SDXL conditioning), on the U-Net's device."""
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    if device.type != "meta":
        torch.manual_seed(seed)
    cfg = unet.config
    inputs = {
        "sample": torch.randn(rows, cfg.in_channels, *latent_hw, device=device, dtype=dtype),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": torch.randn(rows, tokens, cfg.cross_attention_dim, device=device, dtype=dtype),
    }
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, text_dim, device=device, dtype=dtype),
                                       "time_ids": torch.randn(rows, 6, device=device, dtype=dtype)}
    return inputs


def count_step(unet, method: str, latent_hw: tuple[int, int], tokens: int, *, batch: int = 1,
               levels: Sequence[int] | None = None, pag_layers: str | Sequence[str] = "mid",
               guidance_scale: float = 7.5, pag_scale: float = 3.0) -> CostCounter:
    """Count one guided step of ``method`` as ``attnguide.guide`` runs it (the same taps, branch plan,
    segmentation, rate and combine; ``engine._Engine.forward`` without the pipeline around it), on
    ``unet``'s device: ``meta`` for FLOPs at any size in seconds, a real device for the kernels."""
    from attnguide import attention, segmentation
    from attnguide.guidance import GuidanceConfig, SCFGOptions, combine, plan_step
    from attnguide.segmentation import mask_sources, segment_records

    config = GuidanceConfig(method=method, guidance_scale=guidance_scale, pag_scale=pag_scale,
                            scfg=SCFGOptions(levels=tuple(levels) if levels else None))
    plan = plan_step(config, 0, 1)
    perturb = attention.select_self_attention(unet, pag_layers) if config.uses_pag else []
    pairs = attention.scfg_layers(unet, tuple(levels or attention.default_scfg_levels(unet))) if config.uses_scfg else []
    factors = {lay.name: lay.factor for lay in attention.list_layers(unet)}
    seg_pairs = [(s, c, factors[c]) for s, c in pairs]
    inputs = _step_inputs(unet, batch * len(plan.branches), latent_hw, tokens)
    sources = mask_sources(plan, config, False)
    counter = CostCounter()
    with torch.no_grad(), attention.attention_taps(unet, perturb=perturb, record=pairs) as taps, counter.active():
        taps.branches, taps.record_branches = plan.branches, sources
        taps.records.clear()
        with counter.phase("unet"):
            noise = unet(**inputs, return_dict=False)[0]
        predictions = dict(zip(plan.branches, noise.chunk(len(plan.branches))))
        seg = rate = None
        if sources:
            with counter.phase("segment"):
                seg = segment_records(taps, sources, seg_pairs, tuple(noise.shape[-2:]), config.scfg)
        if plan.scfg:
            opts = config.scfg
            with counter.phase("rate"):
                rate = segmentation.scfg_rate(predictions["uncond"], predictions["cond"], seg, guidance_scale,
                                              opts.rate_min, opts.rate_max, opts.cap, opts.smoothing).to(noise.dtype)
        with counter.phase("combine"):
            combine(predictions, plan, config, rate)
    counter.branches = plan.branches
    return counter


def _builtin_meta(model_path: str | Path | None) -> tuple[dict, int, tuple[int, ...] | None]:
    """(U-Net config, text tokens, S-CFG levels) of the built-in model (or a diffusers folder), from its files."""
    from attnguide.pipelines import builtin_model_path, recommended_settings

    path = Path(model_path) if model_path is not None else builtin_model_path()
    config = json.loads((path / "unet" / "config.json").read_text())
    text = json.loads((path / "text_encoder" / "config.json").read_text())
    levels = recommended_settings(path)["scfg_levels"]
    return config, int(text.get("max_position_embeddings", SD_TOKENS)), tuple(levels) if levels else None


def counting_unet(model: str, device: str = "meta", model_path: str | Path | None = None, dtype: str = "float32"):
    """(U-Net, native latent size, text tokens, S-CFG levels) of ``model``, built from its config on
    ``device`` (``meta``: no memory, no weights; the architecture only)."""
    from diffusers import UNet2DConditionModel

    if model not in COUNT_MODELS:
        raise ValueError(f"model must be one of {COUNT_MODELS}, got {model!r}")
    levels = None
    if model == "builtin":
        config, tokens, levels = _builtin_meta(model_path)
    else:
        config, tokens = dict(UNET_CONFIGS[model]), 24 if model == "tiny" else SD_TOKENS
    with torch.device(device):
        torch.manual_seed(0)
        unet = (UNet2DConditionModel.from_config(config) if model == "builtin" else UNet2DConditionModel(**config)).eval()
    if dtype != "float32":
        unet = unet.to(getattr(torch, dtype))
    native, _ = config_geometry(model, model_path)
    vae_factor = native // int(unet.config.sample_size)
    return unet, vae_factor, tokens, levels


def count_costs(models: Sequence[str] = ("builtin", "sd15", "sdxl"), methods: Sequence[str] = METHOD_NAMES, *,
                sizes: dict[str, int] | None = None, batch: int = 1, device: str = "meta",
                model_path: str | Path | None = None, steps: int | None = None, progress: bool = False,
                dtype: str = "float32") -> dict:
    """Per model and method: U-Net evaluations per image, FLOPs per step (U-Net and attnguide's extra
    arithmetic apart), their exact integer counts and ratios to ``cfg``, and the attention kernels
    (SDPA calls vs explicit softmax; only a real device shows which SDPA kernel ran).

    sizes: image side per model (default: native, i.e. 512 for sd15 and 1024 for sdxl).
    steps: sampling steps for the per-image evaluation count (default: the model's recommended, else 50)."""
    from attnguide.guidance import DEFAULTS, GuidanceConfig, plan_step
    from attnguide.pipelines import recommended_settings

    methods = [m for m in METHOD_NAMES if m in set(methods) | {"cfg"}]
    report: dict[str, Any] = {"meta": {"device": device, "dtype": dtype, "batch": batch, "torch": torch.__version__,
                                       "pag_layers": "mid", "guidance_scale": DEFAULTS["guidance_scale"],
                                       "pag_scale": DEFAULTS["pag_scale"],
                                       "flops": "torch.utils.flop_counter.FlopCounterMode (matmul/conv/attention; "
                                                "a multiply-add = 2 FLOPs; elementwise ops not counted)"},
                              "models": {}}
    for model in models:
        t0 = time.perf_counter()
        unet, vae_factor, tokens, levels = counting_unet(model, device, model_path, dtype)
        side = (sizes or {}).get(model) or config_geometry(model, model_path)[0]
        latent = (side // vae_factor, side // vae_factor)
        n_steps = steps or recommended_settings(model_path if model == "builtin" else "")["num_inference_steps"]
        per: dict[str, dict] = {}
        for method in methods:
            c = count_step(unet, method, latent, tokens, batch=batch, levels=levels)
            config = GuidanceConfig(method=method)
            evaluations = sum(len(plan_step(config, i, n_steps).branches) for i in range(n_steps))
            unet_flops = c.flops["unet"] + c.flops["identity"]
            extra = {p: c.flops[p] for p in EXTRA_PHASES}
            per[method] = {
                "branches": list(c.branches), "unet_evals_per_image_per_step": len(c.branches),
                "unet_evals_per_image": evaluations, "steps": n_steps,
                "unet_flops_per_image": unet_flops // batch, "identity_flops_per_image": c.flops["identity"] // batch,
                "extra_flops_per_image": {p: v // batch for p, v in extra.items()},
                "total_flops_per_image": (unet_flops + sum(extra.values())) // batch,
                "attention": {"unet": c.op_summary(["unet"]), "identity": c.op_summary(["identity"]),
                              "record": c.op_summary(["record"]), "segment": c.op_summary(["segment"])},
            }
            if progress:
                print(f"  {model} {method}: {unet_flops / batch / 1e9:.2f} GFLOP U-Net/image/step", file=sys.stderr)
        ref = per["cfg"]
        for p in per.values():
            p["unet_flops_x_cfg"] = p["unet_flops_per_image"] / ref["unet_flops_per_image"]
            p["total_flops_x_cfg"] = p["total_flops_per_image"] / ref["total_flops_per_image"]
            p["unet_evals_x_cfg"] = p["unet_evals_per_image"] / ref["unet_evals_per_image"]
        layers = attention_layer_count(unet)
        report["models"][model] = {"height": side, "width": side, "latent": list(latent), "tokens": tokens,
                                   "attention_layers": layers, "scfg_levels": list(levels or ()),
                                   "seconds": time.perf_counter() - t0, "methods": per}
    return report


def attention_layer_count(unet) -> int:
    from attnguide import attention

    return len(attention.list_layers(unet))
