"""Attention taps: PAG's identity self-attention and S-CFG's map recording, on diffusers U-Nets.

A tap is an attention processor installed on a few chosen layers only, for the duration of a
``with attention_taps(...)`` block; every other layer keeps its own processor, and the original
processors are put back when the block exits, also when it exits by an exception. Taps are told
which branch each batch chunk is (``TapState.branches``) instead of assuming a chunk order.
The real attention of every layer stays fused (``scaled_dot_product_attention``).
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Iterator

import torch

ALIASES = {"mid": "mid_block", "down": "down_blocks", "up": "up_blocks"}


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of a U-Net."""

    name: str  # module path, e.g. "mid_block.attentions.0.transformer_blocks.0.attn1"
    is_cross: bool
    factor: int  # downsampling factor of its feature map relative to the latent
    heads: int


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under ``torch.compile``'s wrapper (an ``OptimizedModule`` keeps it as ``_orig_mod``),
    else ``model``: layer names are the same for a compiled and an uncompiled denoiser."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


def attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in unwrap(unet).named_modules() if isinstance(m, Attention)}


def _factor(name: str, num_down_blocks: int) -> int:
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return 2 ** int(parts[1])
    if parts[0] == "up_blocks":
        return 2 ** (num_down_blocks - 1 - int(parts[1]))
    return 2 ** (num_down_blocks - 1)  # mid block: resolution of the last down block


def list_layers(unet: torch.nn.Module) -> list[LayerInfo]:
    """All attention layers of a diffusers ``UNet2DConditionModel``-shaped U-Net, in module order
    (of a transformer denoiser: ``transformer_attention.list_layers``)."""
    from . import transformer_attention

    unet = unwrap(unet)
    if transformer_attention.is_transformer(unet):
        return transformer_attention.list_layers(unet)
    num_down = len(getattr(unet, "down_blocks", []))
    layers = []
    for name, module in attention_modules(unet).items():
        # diffusers' own flag (also what its PAG pipelines use): AnimateDiff's motion modules have
        # an "attn2" that is self-attention (double_self_attention), so the name alone misleads.
        flag = getattr(module, "is_cross_attention", None)
        is_cross = bool(flag) if flag is not None else name.endswith("attn2")
        layers.append(LayerInfo(name, is_cross, _factor(name, num_down), int(module.heads)))
    return layers


def components_match(pattern: list[str], name: list[str]) -> bool:
    """Pattern components match the leading components of a name, each exactly or by glob."""
    if len(pattern) > len(name):
        return False
    return all(fnmatch.fnmatchcase(n, p) for p, n in zip(pattern, name))


def _expand(pattern: str) -> list[str]:
    parts = pattern.strip().split(".")
    parts[0] = ALIASES.get(parts[0], parts[0])
    return parts


def select_self_attention(unet: torch.nn.Module, patterns: str | list[str] | tuple[str, ...]) -> list[str]:
    """Names of the self-attention layers selected by ``patterns``.

    A pattern is a dot-separated prefix of layer names, matched component by component (exactly, or
    with ``*``/``?`` globs): ``down_blocks.1`` selects every self-attention layer in down block 1 and
    never down block 10. ``mid``/``down``/``up`` stand for ``mid_block``/``down_blocks``/``up_blocks``.
    Raises ``ValueError`` listing the valid names when a pattern selects nothing or names a
    cross-attention layer.
    """
    from . import transformer_attention

    if transformer_attention.is_transformer(unet):
        return transformer_attention.select_self_attention(unet, patterns)
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    layers = list_layers(unet)
    self_layers = [lay.name for lay in layers if not lay.is_cross]
    cross_layers = [lay.name for lay in layers if lay.is_cross]
    if not self_layers:
        raise ValueError("pag_layers: this U-Net has no self-attention layers, so PAG cannot be applied")
    if not patterns:
        raise ValueError(f"pag_layers must name at least one layer; valid names: {', '.join(self_layers)}")
    return select_by_patterns(patterns, self_layers, cross_layers, _checked_expand)


def _checked_expand(pattern) -> list[str]:
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"pag_layers entries must be non-empty strings, got {pattern!r}")
    return _expand(pattern)


def select_by_patterns(patterns: list, self_layers: list[str], cross_layers: list[str], expand) -> list[str]:
    """The self-attention layers the patterns select (``expand`` turns a pattern into name
    components); a pattern that selects nothing, or only cross-attention, raises an error listing
    the valid names. Shared by U-Nets and transformers."""
    selected: list[str] = []
    for pattern in patterns:
        parts = expand(pattern)
        hits = [n for n in self_layers if components_match(parts, n.split("."))]
        cross_hits = [n for n in cross_layers if components_match(parts, n.split("."))]
        if cross_hits and not hits:
            raise ValueError(
                f"pag_layers pattern {pattern!r} selects cross-attention layers ({', '.join(cross_hits[:4])}); "
                f"PAG perturbs self-attention only. Valid self-attention layers: {', '.join(self_layers)}"
            )
        if not hits:
            raise ValueError(f"pag_layers pattern {pattern!r} matches no self-attention layer. Valid names: {', '.join(self_layers)}")
        selected.extend(h for h in hits if h not in selected)
    return selected


def default_scfg_levels(unet: torch.nn.Module) -> tuple[int, ...]:
    """latent/4 and latent/8 when the U-Net has attention at both (the reference's choice),
    else its two coarsest attention levels."""
    factors = sorted({lay.factor for lay in list_layers(unet) if lay.is_cross})
    if not factors:
        raise ValueError("this U-Net has no cross-attention layers, so S-CFG cannot segment the prompt")
    if 4 in factors and 8 in factors:
        return (4, 8)
    return tuple(factors[-2:])


def scfg_layers(unet: torch.nn.Module, levels: tuple[int, ...]) -> list[tuple[str, str]]:
    """(self-attention, cross-attention) layer pairs of the transformer blocks at ``levels``."""
    layers = list_layers(unet)
    available = sorted({lay.factor for lay in layers if lay.is_cross})
    missing = [f for f in levels if f not in available]
    if missing:
        raise ValueError(f"scfg levels {missing} have no attention layers in this U-Net; available levels: {available}")
    by_name = {lay.name: lay for lay in layers}
    pairs = []
    for layer in layers:
        if layer.is_cross and layer.factor in levels:
            block = layer.name.rsplit(".", 1)[0]
            partner = by_name.get(block + ".attn1")
            if partner is None or partner.is_cross:
                raise ValueError(f"S-CFG needs a self-attention layer beside {layer.name}; none found")
            pairs.append((partner.name, layer.name))
    return pairs


@dataclass
class SelfRecord:
    """Queries and keys of a self-attention layer (rows = recorded batch rows): enough to apply the
    head-averaged attention matrix to any values with fused attention, never forming it."""

    query: torch.Tensor  # (rows, heads, N, d), float32
    key: torch.Tensor
    scale: float
    linear: bool = False  # linear attention (Sana): the map is relu(q)·relu(k) over its row sum, no softmax


@dataclass
class TapState:
    """Shared by the taps of one sampling run. The sampler sets the branches of the next U-Net call;
    taps on recorded layers append what they saw to ``records``."""

    branches: tuple[str, ...] = ()
    record_branches: tuple[str, ...] = ()
    records: dict[str, object] = field(default_factory=dict)

    def rows(self, batch: int, wanted: tuple[str, ...]) -> list[slice]:
        """The batch rows of the ``wanted`` branches, adjacent chunks merged into one slice (so
        taking them is a view, not a copy: uncond + cond are always adjacent)."""
        chunk = batch // len(self.branches)
        merged: list[slice] = []
        for i, b in enumerate(self.branches):
            if b not in wanted:
                continue
            if merged and merged[-1].stop == i * chunk:
                merged[-1] = slice(merged[-1].start, (i + 1) * chunk)
            else:
                merged.append(slice(i * chunk, (i + 1) * chunk))
        return merged


def take_rows(tensor: torch.Tensor, slices: list[slice]) -> torch.Tensor:
    return torch.cat([tensor[s] for s in slices]) if len(slices) != 1 else tensor[slices[0]]


def processor_input(attn, hidden_states: torch.Tensor, temb=None) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """The start every diffusers attention processor shares: spatial norm and (B, C, H, W) -> (B, HW, C).
    Returns (tokens, residual, 4-D shape or None)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = None
    if hidden_states.ndim == 4:
        shape = hidden_states.shape
        hidden_states = hidden_states.view(shape[0], shape[1], shape[2] * shape[3]).transpose(1, 2)
    return hidden_states, residual, shape


def processor_output(attn, hidden_states: torch.Tensor, residual: torch.Tensor, shape: tuple | None) -> torch.Tensor:
    """The shared end: output projection, back to 4-D, residual connection and rescale."""
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _rows_of(value, rows: slice, batch: int):
    """``value[rows]`` for a per-row tensor (leading dimension ``batch``); anything else unchanged."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    return value


class GuidanceAttnProcessor:
    """A tap around a layer's own attention processor (which keeps doing the real attention, so
    IP-Adapter, LoRA or any custom processor keeps working).

    perturb: rows of the ``perturbed`` branch get PAG's identity attention map, so the layer's
        output there is ``to_out(to_v(h))`` (Ahn et al. 2024, §3: the self-attention map softmax(QKᵀ/√d) replaced by I); the other rows go
        through the layer's own processor.
    record: ``"self"`` keeps q/k of the recorded branches; ``"cross"`` keeps their head-averaged
        attention probabilities (rows x N x T), computed explicitly from q/k (small: T tokens).
        q and k are the layer's own ``to_q`` / ``to_k`` outputs, caught by forward hooks
        (``attention_taps`` installs them) while the layer's processor runs, so they are not projected
        a second time (the processor must not modify them in place afterwards; diffusers' do not); a
        processor that does not call them once each (e.g. fused qkv projections) gets them computed
        here as its processor would.
    """

    def __init__(self, name: str, state: "TapState", inner, perturb: bool = False, record: str | None = None) -> None:
        self.name = name
        self.state = state
        self.inner = inner
        self.perturb = perturb
        self.record = record
        self.capturing = False
        self.captured: dict[str, list] = {"q": [], "k": []}

    def capture_hook(self, key: str):
        """A forward hook for ``to_q`` (``key="q"``) or ``to_k`` that keeps its outputs while the tap records."""
        def hook(module, args, output):
            if self.capturing:
                self.captured[key].append(output)
        return hook

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        recording = self.record is not None and bool(self.state.record_branches)
        if not recording:
            return self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        self.captured = {"q": [], "k": []}
        self.capturing = True
        try:
            out = self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        finally:
            self.capturing = False
        captured, self.captured = self.captured, {"q": [], "k": []}
        self.record_maps(attn, hidden_states, encoder_hidden_states, attention_mask, temb, captured)
        return out

    def _attend(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        batch = hidden_states.shape[0]
        perturbed = self.state.rows(batch, ("perturbed",)) if self.perturb and "perturbed" in self.state.branches else []
        if not perturbed:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        # The perturbed chunk is always the last one (guidance.BRANCH_ORDER).
        start = perturbed[0].start
        normal, ptb = slice(0, start), slice(start, batch)
        parts = []
        if start > 0:
            parts.append(self.inner(
                attn, hidden_states[normal], _rows_of(encoder_hidden_states, normal, batch),
                _rows_of(attention_mask, normal, batch), _rows_of(temb, normal, batch), *args,
                **{k: _rows_of(v, normal, batch) for k, v in kwargs.items()},
            ))
        parts.append(identity_attention(attn, hidden_states[ptb], _rows_of(temb, ptb, batch)))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def record_maps(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, captured=None) -> None:
        """Keep q/k (self) or head-averaged probabilities (cross) of the recorded rows: the layer's own
        projections (``captured`` from its processor's call), else computed as its processor computes them."""
        batch = hidden_states.shape[0]
        rows = self.state.rows(batch, self.state.record_branches)
        qs, ks = (captured or {}).get("q", []), (captured or {}).get("k", [])
        normal = batch - sum(s.stop - s.start for s in self.state.rows(batch, ("perturbed",))) if self.perturb else batch
        if len(qs) == 1 and len(ks) == 1 and qs[0].shape[0] == normal and ks[0].shape[0] == normal and qs[0].ndim == 3:
            query, key = take_rows(qs[0], rows), take_rows(ks[0], rows)  # rows lie within the normal (first) rows
            if query.shape[0] != normal:  # a view of some rows would keep the whole batch's q/k alive
                query, key = query.clone(), key.clone()
        else:
            query, key = self._project(attn, hidden_states, encoder_hidden_states, temb, rows)
        n = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query = query.view(n, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(n, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        q, k = query.float(), key.float()
        scale = attn.scale  # the scale the layer's own attention uses
        if self.record == "self":
            self.state.records[self.name] = SelfRecord(q, k, scale)
            return
        logits = q @ k.transpose(-1, -2) * scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            logits = logits + take_rows(mask, rows).float()
        self.state.records[self.name] = logits.softmax(dim=-1).mean(dim=1)  # (rows, N, T)

    def _project(self, attn, hidden_states, encoder_hidden_states, temb, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k of ``rows`` as diffusers' attention processors compute them (group norm, norm_cross)."""
        tokens, _, _ = processor_input(attn, take_rows(hidden_states, rows), take_rows(temb, rows) if torch.is_tensor(temb) else temb)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        if self.record == "self" or encoder_hidden_states is None:
            context = tokens
        else:
            context = encoder_hidden_states[0] if isinstance(encoder_hidden_states, (tuple, list)) else encoder_hidden_states
            context = take_rows(context, rows)
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
        return attn.to_q(tokens), attn.to_k(context)


def identity_attention(attn, hidden_states: torch.Tensor, temb=None) -> torch.Tensor:
    """A self-attention layer whose attention map is the identity: each token attends only to
    itself, so the output is ``to_out(to_v(h))`` (PAG's perturbation, Ahn et al. Sec. 4)."""
    tokens, residual, shape = processor_input(attn, hidden_states, temb)
    if attn.group_norm is not None:
        tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
    return processor_output(attn, attn.to_v(tokens), residual, shape)


@contextlib.contextmanager
def attention_taps(
    unet: torch.nn.Module,
    perturb: list[str] = (),
    record: list[tuple[str, str]] = (),
    state: TapState | None = None,
) -> Iterator[TapState]:
    """Install taps on the named layers for the duration of the block; always restore.

    perturb: self-attention layers that give the ``perturbed`` branch identity attention.
    record: (self, cross) layer pairs whose maps S-CFG reads.
    """
    state = state or TapState()
    modules = attention_modules(unet)
    plan: dict[str, dict] = {}
    for name in perturb:
        plan.setdefault(name, {})["perturb"] = True
    for self_name, cross_name in record:
        plan.setdefault(self_name, {})["record"] = "self"
        plan.setdefault(cross_name, {})["record"] = "cross"
    unknown = [n for n in plan if n not in modules]
    if unknown:
        raise ValueError(f"no attention layer named {unknown}; valid names: {', '.join(modules)}")
    originals = {name: modules[name].processor for name in plan}
    handles = []
    try:
        for name, options in plan.items():
            tap = GuidanceAttnProcessor(name, state, originals[name], **options)
            modules[name].set_processor(tap)
            if options.get("record"):  # the recording reuses the layer's own q/k projections
                for key, linear in (("q", getattr(modules[name], "to_q", None)), ("k", getattr(modules[name], "to_k", None))):
                    if isinstance(linear, torch.nn.Module):
                        handles.append(linear.register_forward_hook(tap.capture_hook(key)))
        yield state
    finally:
        restore_taps(handles, modules, originals, state)


def restore_taps(handles: list, modules: dict[str, torch.nn.Module], originals: dict[str, object], state: TapState) -> None:
    """Remove the hooks, put every layer's own processor back and drop what was recorded."""
    for handle in handles:
        handle.remove()
    for name, processor in originals.items():
        modules[name].set_processor(processor)
    state.records.clear()
