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

Command line: ``attnguide bench --model tiny`` (see ``attnguide bench --help``), or
``python benchmarks/run_bench.py ...``.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import click
import torch

from ..attention import processor_input, processor_output
from ..guidance import METHODS, REGISTRY

MODELS = ("tiny", "builtin", "sd15", "sdxl")
METHOD_NAMES = METHODS
PEER_NAMES = ("diffusers-cfg", "diffusers-pag", "diffusers-cfg+pag", "unfused-scfg")
MEMORY_MODES = ("fresh", "shared", "inprocess", "off")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_PROMPT = "a red circle to the left of a blue square"
# U-Net batch chunks per step of every configuration (per image).
BRANCHES = {**{m.name: len(m.branches) for m in REGISTRY.values()}, "diffusers-cfg": 2, "diffusers-pag": 2, "diffusers-cfg+pag": 3, "unfused-scfg": 2}
SD_TOKENS = 77  # CLIP's context length in SD 1.x / SDXL: the token count of every cross-attention map

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


# ---------------------------------------------------------------------------------------------
# Models


def _sd_tokenizer(max_length: int):
    """The built-in word tokenizer (offline), padded to ``max_length`` tokens."""
    from attnguide.builtin.model import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = max_length
    return tokenizer


def _scheduler():
    from attnguide.builtin.model import build_scheduler

    return build_scheduler()


def _clip_text(vocab: int, hidden: int, layers: int, heads: int, ffn: int, positions: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _sd_vae(scaling_factor: float, sample_size: int, force_upcast: bool):
    """Stable Diffusion's AutoencoderKL architecture (the same for SD 1.x and SDXL), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size, scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    ).eval()


# The U-Net architectures of the random-weight models (also built on the meta device by ``count_costs``).
UNET_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=(2, 2, 2), norm_num_groups=8,
    ),
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        use_linear_projection=True, norm_num_groups=32,
    ),
}


def _tiny_components() -> dict:
    """The test suite's tiny SD-shaped model: a 3-level U-Net on 16x16 latents, 32-pixel images."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer = _sd_tokenizer(24)
    unet = UNet2DConditionModel(**UNET_CONFIGS["tiny"]).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=32, mid_block_add_attention=False,
    ).eval()
    text_encoder = _clip_text(len(tokenizer), 32, 2, 2, 64, 24)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=_scheduler(),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sd15_components() -> dict:
    """Stable Diffusion 1.5's U-Net, VAE and CLIP ViT-L text encoder architectures with random
    weights (timing does not depend on the weights); the word tokenizer pads to 77 tokens like CLIP."""
    from diffusers import UNet2DConditionModel

    tokenizer = _sd_tokenizer(SD_TOKENS)
    unet = UNet2DConditionModel(**UNET_CONFIGS["sd15"]).eval()
    text_encoder = _clip_text(len(tokenizer), 768, 12, 12, 3072, SD_TOKENS)
    return dict(unet=unet, vae=_sd_vae(0.18215, 512, False), text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl_components() -> dict:
    """SDXL base's U-Net, VAE and both text encoders' architectures with random weights."""
    from diffusers import UNet2DConditionModel

    tokenizer = _sd_tokenizer(SD_TOKENS)
    unet = UNet2DConditionModel(**UNET_CONFIGS["sdxl"]).eval()
    return dict(
        unet=unet, vae=_sd_vae(0.13025, 1024, True),
        text_encoder=_clip_text(len(tokenizer), 768, 12, 12, 3072, SD_TOKENS),
        text_encoder_2=_clip_text(len(tokenizer), 1280, 32, 20, 5120, SD_TOKENS, projection=1280),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
    )


def build_pipeline(model: str = "tiny", device: str = "cpu", dtype: str = "float32", model_path: str | Path | None = None):
    """The benchmark's pipeline for ``model``.

    tiny: the test suite's tiny random model (smoke tests). builtin: the package's trained model
    (or the diffusers folder ``model_path``). sd15 / sdxl: Stable Diffusion 1.5 / SDXL architectures
    with random weights (no download; timing does not depend on weights).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    if model == "builtin":
        from attnguide.pipelines import builtin_model_path, load_pipeline

        path = Path(model_path) if model_path is not None else builtin_model_path()
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model 'builtin': no trained model at {path} (no model_index.json). Train and export it first "
                "(`attnguide train`), pass a diffusers folder with --model-path, or benchmark --model tiny/sd15/sdxl."
            )
        return load_pipeline(path, device=device, dtype=dtype)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(0)
    if model == "sdxl":
        pipe = StableDiffusionXLPipeline(**_sdxl_components())
    else:
        pipe = StableDiffusionPipeline(**(_tiny_components() if model == "tiny" else _sd15_components()))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)


def _geometry(pipe) -> tuple[int, int]:
    """(native image size, the multiple every image side must be) of a built pipeline."""
    vae_factor = int(pipe.vae_scale_factor)
    return pipe.unet.config.sample_size * vae_factor, vae_factor * 2 ** (len(pipe.unet.config.up_block_types) - 1)


def _config_geometry(model: str, model_path: str | Path | None) -> tuple[int, int]:
    """``_geometry`` without building the model (read from its configs)."""
    if model == "tiny":
        return 32, 8
    if model == "sd15":
        return 512, 64
    if model == "sdxl":
        return 1024, 32
    from attnguide.pipelines import builtin_model_path

    path = Path(model_path) if model_path is not None else builtin_model_path()
    try:
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError("no model_index.json")
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"model 'builtin': no trained model at {path} ({exc}). Train and export it first (`attnguide train`), "
            "pass a diffusers folder with --model-path, or benchmark --model tiny/sd15/sdxl."
        ) from None
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return unet["sample_size"] * vae_factor, vae_factor * 2 ** (len(unet["up_block_types"]) - 1)


def _resolve(size: tuple[int | None, int | None], geometry: tuple[int, int], model: str, device: str) -> tuple[int, int]:
    """The (height, width) to run: the given one (checked), else the native size (256 for
    SD 1.5 / SDXL on CPU, where the native size takes minutes per step)."""
    native, multiple = geometry
    if model in ("sd15", "sdxl") and not str(device).startswith("cuda"):
        native = 256
    out = []
    for name, value in zip(("height", "width"), size):
        value = native if value is None else value
        if value <= 0 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} for model {model!r}, got {value}")
        out.append(value)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# The reference implementation's cost model: explicit softmax in every attention layer


class AttentionMapStore:
    """Keeps the head-averaged attention maps of the current step, like the S-CFG reference's
    ``AttentionStore`` (maps of every layer at latent/2 and coarser, replaced every step)."""

    def __init__(self, min_factor: int = 2) -> None:
        self.min_factor = min_factor
        self.maps: dict[str, torch.Tensor] = {}

    def add(self, name: str, factor: int, probs: torch.Tensor) -> None:
        if factor >= self.min_factor:
            self.maps[name] = probs

    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.maps.values())


class ExplicitAttnProcessor:
    """diffusers' classic ``AttnProcessor`` arithmetic (baddbmm + softmax: the full N x T map is
    formed) that also hands the head-averaged map to an ``AttentionMapStore``."""

    def __init__(self, name: str, factor: int, store: AttentionMapStore) -> None:
        self.name = name
        self.factor = factor
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        hidden_states, residual, shape = processor_input(attn, hidden_states, temb)
        batch, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch * heads, N, T), explicit
        self.store.add(self.name, self.factor, probs.view(-1, attn.heads, *probs.shape[1:]).mean(dim=1))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        return processor_output(attn, hidden_states, residual, shape)


@contextlib.contextmanager
def unfused_attention(unet: torch.nn.Module, store: AttentionMapStore | None = None) -> Iterator[AttentionMapStore]:
    """Make every attention layer of ``unet`` compute (and keep) explicit softmax maps for the
    duration of the block, like the S-CFG reference implementation; restore the processors after.

    Layers that attnguide's own taps take over inside ``generate`` (the recorded S-CFG layers and
    the PAG layers) run the taps instead; all the others, including every full-resolution layer
    where the explicit maps are largest, stay explicit.
    """
    from attnguide import attention

    store = store if store is not None else AttentionMapStore()
    modules = attention._attention_modules(unet)
    factors = {layer.name: layer.factor for layer in attention.list_layers(unet)}
    originals = {name: module.get_processor() for name, module in modules.items()}
    try:
        for name, module in modules.items():
            module.set_processor(ExplicitAttnProcessor(name, factors[name], store))
        yield store
    finally:
        for name, processor in originals.items():
            modules[name].set_processor(processor)
        store.maps.clear()


# ---------------------------------------------------------------------------------------------
# Configurations


@dataclass
class RunSettings:
    """What every configuration is run with."""

    prompt: str = DEFAULT_PROMPT
    batch: int = 1
    seed: int = 0
    guidance_scale: float = 7.5
    pag_scale: float = 3.0


@dataclass
class Runner:
    """One benchmarked configuration. ``run(steps, height, width, on_step)`` samples one batch and
    calls ``on_step(i)`` at the end of every step (after the scheduler)."""

    name: str
    kind: str  # "attnguide" or "peer"
    branches: int  # U-Net batch chunks per step
    run: Callable[[int, int, int, Callable[[int], None]], None]


def _is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def _peer_pipelines(pipe) -> tuple[Any, Any]:
    """diffusers' plain and PAG pipelines sharing ``pipe``'s components (no copies)."""
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline, StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline

    components = dict(pipe.components)
    if _is_sdxl(pipe):
        plain = StableDiffusionXLPipeline(**components)
        pag = StableDiffusionXLPAGPipeline(**components, pag_applied_layers="mid")
    else:
        plain = StableDiffusionPipeline(**components, requires_safety_checker=False)
        pag = StableDiffusionPAGPipeline(**components, requires_safety_checker=False, pag_applied_layers="mid")
    for p in (plain, pag):
        p.set_progress_bar_config(disable=True)
    return plain, pag


def make_runners(pipe, settings: RunSettings, methods: Sequence[str] = METHOD_NAMES, peers: Sequence[str] = PEER_NAMES) -> list[Runner]:
    """The runners for attnguide's ``methods`` and the named ``peers`` on ``pipe``."""
    from attnguide import generate

    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad:
        raise ValueError(f"methods: unknown {bad}; choose from {METHOD_NAMES}")
    bad = [p for p in peers if p not in PEER_NAMES]
    if bad:
        raise ValueError(f"peers: unknown {bad}; choose from {PEER_NAMES}")
    s = settings

    def ours(method: str, unfused: bool = False):
        def run(steps: int, height: int, width: int, on_step: Callable[[int], None]) -> None:
            with unfused_attention(pipe.unet) if unfused else contextlib.nullcontext():
                generate(pipe, [s.prompt], method=method, guidance_scale=s.guidance_scale, pag_scale=s.pag_scale,
                         pag_layers="mid", num_inference_steps=steps, height=height, width=width,
                         num_images_per_prompt=s.batch, seed=s.seed, output_type="pt", progress=False,
                         callback=lambda info: on_step(info.step))
        return run

    def theirs(peer, cfg: bool, pag: bool):
        def run(steps: int, height: int, width: int, on_step: Callable[[int], None]) -> None:
            kwargs = {"pag_scale": s.pag_scale} if pag else {}
            peer(s.prompt, num_inference_steps=steps, guidance_scale=s.guidance_scale if cfg else 1.0, height=height,
                 width=width, num_images_per_prompt=s.batch, output_type="pt",
                 generator=[torch.Generator().manual_seed(s.seed + i) for i in range(s.batch)],
                 callback_on_step_end=lambda _pipe, i, _t, _kw: (on_step(i), {})[1], **kwargs)
        return run

    runners = [Runner(m, "attnguide", BRANCHES[m], ours(m)) for m in methods]
    if peers:
        plain, pag = _peer_pipelines(pipe)
        table = {
            "diffusers-cfg": theirs(plain, True, False),
            "diffusers-pag": theirs(pag, False, True),
            "diffusers-cfg+pag": theirs(pag, True, True),
            "unfused-scfg": ours("scfg", unfused=True),
        }
        runners += [Runner(p, "peer", BRANCHES[p], table[p]) for p in peers]
    return runners


# ---------------------------------------------------------------------------------------------
# Measuring


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

    def on_unet(*_) -> None:
        cpu_starts.append(time.process_time())
        starts.append(_now(device))

    handles = [pipe.unet.register_forward_pre_hook(on_unet),
               pipe.unet.register_forward_hook(lambda *_: unet_ends.append(_now(device)))]
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


def _memory_child() -> None:
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


def _run_memory_children(groups: list[list[str]], spec: dict, progress: bool) -> dict[str, dict]:
    """Measure CPU memory of each group of configurations in its own fresh child process."""
    from tqdm.auto import tqdm

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), MALLOC_TRIM_THRESHOLD_=str(128 * 1024),
               PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    results: dict[str, dict] = {}
    for group in tqdm(groups, desc=f"memory {spec['height']}x{spec['width']}", disable=not progress):
        child = subprocess.run(
            [sys.executable, "-c", "from attnguide.evaluation.bench import _memory_child; _memory_child()"],
            input=json.dumps(dict(spec, configs=group)), capture_output=True, text=True, env=env,
        )
        line = next((lay for lay in child.stdout.splitlines() if lay.startswith("BENCH-MEMORY ")), None)
        if child.returncode != 0 or line is None:
            tail = "\n".join((child.stderr or child.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"memory measurement of {group} failed (exit {child.returncode}):\n{tail}")
        results.update(json.loads(line[len("BENCH-MEMORY "):]))
    return results


# ---------------------------------------------------------------------------------------------
# The benchmark


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


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


def _summarise(configs: dict[str, dict]) -> tuple[dict, list, list]:
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
    guidance_scale: float = 7.5,
    pag_scale: float = 3.0,
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
    sizes = _sizes(heights, widths)
    cuda = str(device).startswith("cuda")
    child_memory = not cuda and memory in ("fresh", "shared")
    threads = torch.get_num_threads()
    settings = RunSettings(prompt=prompt, batch=batch, seed=seed, guidance_scale=guidance_scale, pag_scale=pag_scale)
    configs_all = methods + peer_list

    # Memory children first, before this process holds a (possibly huge) model of its own.
    child_results: dict[tuple[int | None, int | None], dict] = {}
    if child_memory:
        geometry = _geometry(pipe) if pipe is not None else _config_geometry(model, model_path)
        resolved = [_resolve(size, geometry, model, device) for size in sizes]
        spec = dict(model=model, device=device, dtype=dtype, model_path=str(model_path) if model_path else None,
                    settings=settings.__dict__, steps=1, threads=threads)
        groups = [[c] for c in configs_all] if memory == "fresh" else [configs_all]
        for (h, w), size in zip(resolved, sizes):
            child_results[size] = _run_memory_children(groups, dict(spec, height=h, width=w), progress)
    if repeats == 0:  # memory only: the children did everything
        sizes_resolved = resolved
    else:
        if pipe is None:
            pipe = build_pipeline(model, device, dtype, model_path)
        sizes_resolved = [_resolve(size, _geometry(pipe), model, device) for size in sizes]

    from diffusers.utils import logging as dlogging
    from tqdm.auto import tqdm

    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # diffusers' per-call notices would drown the progress bar
    results = []
    try:
        with torch.no_grad():
            runners = make_runners(pipe, settings, methods, peer_list) if repeats else []
            for size, (h, w) in zip(sizes, sizes_resolved):
                per = {name: {"kind": "attnguide" if name in METHOD_NAMES else "peer", "branches": BRANCHES[name],
                              "unet_images_per_step": BRANCHES[name] * batch, "step_s": [], "unet_s": [], "rest_s": [],
                              "cpu_step_s": [], "run_s": [], "cuda_memory": []} for name in configs_all}
                total = len(runners) * (warmup + repeats)
                bar = tqdm(total=total, desc=f"{model} {h}x{w}", disable=not progress or not runners)
                for _ in range(warmup):
                    for r in runners:
                        bar.set_postfix_str(f"warm-up {r.name}")
                        timed_run(pipe, r, 1, h, w, device)  # every shape of a step, once
                        bar.update()
                for rep in range(repeats):
                    shift = rep % len(runners)
                    for r in runners[shift:] + runners[:shift]:  # rotate: no configuration always runs first
                        bar.set_postfix_str(r.name)
                        step_s, run_s, extras = timed_run(pipe, r, steps, h, w, device)
                        per[r.name]["step_s"] += step_s
                        per[r.name]["cpu_step_s"] += extras.get("cpu_step_s", [])
                        per[r.name]["unet_s"] += extras["unet_s"]
                        per[r.name]["rest_s"] += extras["rest_s"]
                        per[r.name]["run_s"].append(run_s)
                        if "cuda_memory" in extras:
                            per[r.name]["cuda_memory"].append(extras["cuda_memory"])
                        bar.update()
                bar.close()
                if memory == "inprocess" and not cuda:  # approximate: the heap keeps what earlier runs freed
                    for r in tqdm(runners, desc="memory (in process)", disable=not progress):
                        per[r.name]["memory"] = measure_cpu_memory(r, 1, h, w)
                for name, c in per.items():
                    if c["step_s"]:
                        c["step_ms"] = 1000 * _median(c["step_s"])
                        c["cpu_step_ms"] = 1000 * _median(c["cpu_step_s"]) if c["cpu_step_s"] else None
                        c["unet_ms"] = 1000 * _median(c["unet_s"])
                        c["rest_ms"] = 1000 * _median(c["rest_s"])
                        c["image_s"] = _median(c["run_s"]) / batch
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
                    if size in child_results and name in child_results[size]:
                        c["memory"] = dict(child_results[size][name], process="fresh" if memory == "fresh" else "shared")
                ratios, bars, controls = _summarise(per)
                results.append({"height": h, "width": w, "configs": per, "ratios": ratios, "bars": bars, "controls": controls})
    finally:
        dlogging.set_verbosity(verbosity)

    import diffusers

    report = {
        "meta": {
            "model": model, "model_path": str(model_path) if model_path else None, "device": device, "dtype": dtype,
            "steps": steps, "batch": batch, "repeats": repeats, "warmup": warmup, "memory": memory,
            "memory_steps": 1 if memory != "off" and not cuda else steps, "seed": seed,
            "guidance_scale": guidance_scale, "pag_scale": pag_scale, "pag_layers": "mid", "prompt": prompt,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": threads,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cuda_device": torch.cuda.get_device_name(device) if cuda else None,
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
        },
        "results": results,
    }
    if json_path is not None:
        write_json(report, json_path)
    return report


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


# ---------------------------------------------------------------------------------------------
# Report


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


# ---------------------------------------------------------------------------------------------
# Deterministic cost accounting: U-Net evaluations, FLOPs and attention kernels per step

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
        record = attention.GuidanceAttnProcessor._record
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
        attention.GuidanceAttnProcessor._record = counted_record
        attention.identity_attention = counted_identity
        try:
            with _Ops():
                yield self
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
            attention.GuidanceAttnProcessor._record = record
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
    from attnguide.engine import _mask_sources, _segment
    from attnguide.guidance import GuidanceConfig, SCFGOptions, combine, plan_step

    config = GuidanceConfig(method=method, guidance_scale=guidance_scale, pag_scale=pag_scale,
                            scfg=SCFGOptions(levels=tuple(levels) if levels else None))
    plan = plan_step(config, 0, 1)
    perturb = attention.select_self_attention(unet, pag_layers) if config.uses_pag else []
    pairs = attention.scfg_layers(unet, tuple(levels or attention.default_scfg_levels(unet))) if config.uses_scfg else []
    factors = {lay.name: lay.factor for lay in attention.list_layers(unet)}
    seg_pairs = [(s, c, factors[c]) for s, c in pairs]
    inputs = _step_inputs(unet, batch * len(plan.branches), latent_hw, tokens)
    sources = _mask_sources(plan, config, False)
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
                seg = _segment(taps, sources, seg_pairs, tuple(noise.shape[-2:]), config.scfg)
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
    from attnguide.pipelines import builtin_model_path

    path = Path(model_path) if model_path is not None else builtin_model_path()
    config = json.loads((path / "unet" / "config.json").read_text())
    text = json.loads((path / "text_encoder" / "config.json").read_text())
    settings = path / "attnguide.json"
    levels = json.loads(settings.read_text()).get("scfg_levels") if settings.is_file() else None
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
    native, _ = _config_geometry(model, model_path)
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
    from attnguide.guidance import GuidanceConfig, plan_step

    methods = [m for m in METHOD_NAMES if m in set(methods) | {"cfg"}]
    report: dict[str, Any] = {"meta": {"device": device, "dtype": dtype, "batch": batch, "torch": torch.__version__,
                                       "pag_layers": "mid", "guidance_scale": 7.5, "pag_scale": 3.0,
                                       "flops": "torch.utils.flop_counter.FlopCounterMode (matmul/conv/attention; "
                                                "a multiply-add = 2 FLOPs; elementwise ops not counted)"},
                              "models": {}}
    for model in models:
        t0 = time.perf_counter()
        unet, vae_factor, tokens, levels = counting_unet(model, device, model_path, dtype)
        side = (sizes or {}).get(model) or _config_geometry(model, model_path)[0]
        latent = (side // vae_factor, side // vae_factor)
        n_steps = steps or (30 if model == "builtin" else 50)
        per: dict[str, dict] = {}
        for method in methods:
            c = count_step(unet, method, latent, tokens, batch=batch, levels=levels)
            config = GuidanceConfig(method=method, guidance_scale=7.5, pag_scale=3.0)
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


# ---------------------------------------------------------------------------------------------
# Command line


def _names(value: str, allowed: Sequence[str], param: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise click.BadParameter(f"unknown {bad or 'empty list'}; choose from {', '.join(allowed)}", param_hint=param)
    return names


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", type=click.Choice(MODELS), default="tiny", help="tiny (smoke), builtin (trained), sd15 / sdxl (real architectures, random weights).")
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
@click.option("--guidance-scale", type=click.FloatRange(0, 100), default=7.5)
@click.option("--pag-scale", type=click.FloatRange(0, 100), default=3.0)
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
        res = report["results"][0]
        costs = count_costs([model], method_list, sizes={model: res["height"]}, batch=batch, device=device, dtype=dtype,
                            model_path=model_path)
        click.echo("### attention op profile and FLOPs per step\n")
        click.echo(format_costs(costs))
        report["profile"] = costs
        if json_path:
            write_json(report, json_path)
    if json_path:
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    bench()
