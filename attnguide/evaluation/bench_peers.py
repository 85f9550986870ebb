"""The benchmarked configurations: attnguide's methods and the peers (diffusers' CFG / PAG pipelines on the
same components, and ``unfused-scfg``: S-CFG with an explicit-softmax attention processor in every other
layer, the cost model of the S-CFG reference implementation)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ..attention import processor_input, processor_output
from ..guidance import DEFAULTS, METHODS, REGISTRY
from ..pipeline_call import runs_separate_cfg

METHOD_NAMES = METHODS
PEER_NAMES = ("diffusers-cfg", "diffusers-pag", "diffusers-cfg+pag", "unfused-scfg")
DEFAULT_PROMPT = "a red circle to the left of a blue square"
# U-Net batch chunks per step of every configuration (per image).
BRANCHES = {**{m.name: len(m.branches) for m in REGISTRY.values()}, "diffusers-cfg": 2, "diffusers-pag": 2, "diffusers-cfg+pag": 3, "unfused-scfg": 2}


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
    modules = attention.attention_modules(unet)
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
    guidance_scale: float = DEFAULTS["guidance_scale"]
    pag_scale: float = DEFAULTS["pag_scale"]
    call_kwargs: dict = field(default_factory=dict)  # the pipeline's own extra arguments (tiny transformers)


@dataclass
class Runner:
    """One benchmarked configuration. ``run(steps, height, width, on_step)`` samples one batch and
    calls ``on_step(i)`` at the end of every step (after the scheduler)."""

    name: str
    kind: str  # "attnguide" or "peer"
    branches: int  # U-Net batch chunks per step
    run: Callable[[int, int, int, Callable[[int], None]], None]


def is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def _transformer_family(pipe):
    """The ``tiny_transformers`` family of a transformer pipeline (by its class), else None."""
    from .tiny_transformers import FAMILIES

    return next((f for f in FAMILIES.values() if f.pipeline == type(pipe).__name__), None)


def peers_for(model: str) -> tuple[str, ...]:
    """The peers that exist for ``model``: all four on U-Nets; on a tiny transformer family diffusers'
    plain pipeline, and its PAG class where diffusers has one (HunyuanDiT's crashes without CFG);
    ``unfused-scfg`` models the U-Net reference code only."""
    from .bench_models import transformer_family

    family = transformer_family(model)
    if family is None:
        return PEER_NAMES
    pag = () if family.pag_pipeline is None else ("diffusers-cfg+pag",) if family.name == "hunyuan-dit" else ("diffusers-pag", "diffusers-cfg+pag")
    return ("diffusers-cfg", *pag)


def _peer_pipelines(pipe) -> tuple[Any, Any]:
    """diffusers' plain and PAG pipelines sharing ``pipe``'s components (no copies); the PAG one is
    None where diffusers has none."""
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline, StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline

    components = dict(pipe.components)
    family = _transformer_family(pipe)
    if family is not None:
        from .tiny_transformers import pipeline_from

        plain = pipeline_from(family.pipeline, components)
        pag = pipeline_from(family.pag_pipeline, components, pag_applied_layers=[family.pag_layers]) if family.pag_pipeline else None
        return plain, pag
    if is_sdxl(pipe):
        plain = StableDiffusionXLPipeline(**components)
        pag = StableDiffusionXLPAGPipeline(**components, pag_applied_layers="mid")
    else:
        plain = StableDiffusionPipeline(**components, requires_safety_checker=False)
        pag = StableDiffusionPAGPipeline(**components, requires_safety_checker=False, pag_applied_layers="mid")
    for p in (plain, pag):
        p.set_progress_bar_config(disable=True)
    return plain, pag


def _step_reporting_scheduler(pipe, on_step: Callable[[int], None]):
    """A copy of ``pipe``'s scheduler that reports the end of every step (after its ``step``), where
    the peers' ``callback_on_step_end`` reports it: the same step boundary for every configuration,
    also where a step makes two denoiser calls (Flux's true CFG)."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    step, count = scheduler.step, iter(range(10**9))

    def reporting_step(*args, **kwargs):
        out = step(*args, **kwargs)
        on_step(next(count))
        return out

    scheduler.step = reporting_step
    return scheduler


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
                         scheduler=_step_reporting_scheduler(pipe, on_step), pipeline_kwargs=s.call_kwargs or None)
        return run

    def theirs(peer, cfg: bool, pag: bool):
        def run(steps: int, height: int, width: int, on_step: Callable[[int], None]) -> None:
            kwargs = dict(s.call_kwargs, **({"pag_scale": s.pag_scale} if pag else {}))
            w = s.guidance_scale if cfg else 1.0
            if runs_separate_cfg(peer):  # Flux: CFG is true CFG
                kwargs.update(true_cfg_scale=w, negative_prompt="" if cfg else None)
                w = 1.0
            peer(s.prompt, num_inference_steps=steps, guidance_scale=w, height=height,
                 width=width, num_images_per_prompt=s.batch, output_type="pt",
                 generator=[torch.Generator().manual_seed(s.seed + i) for i in range(s.batch)],
                 callback_on_step_end=lambda _pipe, i, _t, _kw: (on_step(i), {})[1], **kwargs)
        return run

    runners = [Runner(m, "attnguide", BRANCHES[m], ours(m)) for m in methods]
    if peers:
        plain, pag = _peer_pipelines(pipe)
        family = _transformer_family(pipe)
        missing = [p for p in peers if p not in peers_for(f"tiny-{family.name}" if family else "tiny")]
        if missing:
            raise ValueError(f"peers: {missing} do not exist for {type(pipe).__name__}")
        table = {
            "diffusers-cfg": theirs(plain, True, False),
            "diffusers-pag": theirs(pag, False, True),
            "diffusers-cfg+pag": theirs(pag, True, True),
            "unfused-scfg": ours("scfg", unfused=True),
        }
        runners += [Runner(p, "peer", BRANCHES[p], table[p]) for p in peers]
    return runners
