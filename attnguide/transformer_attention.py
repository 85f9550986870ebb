"""Attention taps for transformer denoisers (DiT / MMDiT): SD3, PixArt-Σ, Sana, HunyuanDiT, Flux.

The U-Net taps (``attention``) assume one kind of layer; a transformer has up to four:

``self``   plain self-attention over image tokens (PixArt-Σ, HunyuanDiT ``attn1``; Sana's linear
           ``attn1``; SD3.5's second image-only ``attn2``). PAG: the perturbed rows get ``to_out(to_v(h))``
           (the identity map; for Sana's linear attention that is also what diffusers does).
``cross``  image queries, text keys (PixArt-Σ, HunyuanDiT, Sana ``attn2``). Never perturbed; S-CFG reads its
           head-averaged probabilities.
``joint``  MMDiT joint attention over [image ; text] (SD3 ``attn``, Flux's double-stream ``attn``).
           PAG: in the perturbed rows only the image→image block becomes the identity: an image token
           attends to itself and to the text tokens (softmax over those), text tokens attend to everything
           as usual — what diffusers' SD3 PAG processor does with an additive −inf mask, computed here
           without an N×N mask (one N×T logit block plus the diagonal). Unlike diffusers' processor, the
           layer's q/k RMS norms (SD3.5) are applied.
``single`` Flux's single-stream attention over one [text ; image] sequence: perturbed like ``joint``.

S-CFG on joint attention reads the image-query rows: their image→text block gives the per-token maps and
their image→image block the self-attention for the completion. Each block's rows are renormalised to sum
to one per head (which is the softmax over that block's keys alone) and then averaged over heads, so the
maps are exactly what a separate cross- / self-attention layer with the same queries and keys would give.

Layer names are module paths (``transformer_blocks.3.attn``); ``pag_layers`` patterns match them
component by component (``transformer_blocks.1`` never selects ``transformer_blocks.10``). Shortcuts:
an integer (or digit string) ``k`` is block ``k`` of the model's main block list, ``blocks`` stands for
that list (diffusers' docstring spelling ``blocks.13``), ``single`` for Flux's ``single_transformer_blocks``,
and ``mid`` for the middle block of the main list (the analogue of a U-Net's mid block).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .attention import LayerInfo, SelfRecord, TapState, identity_attention, restore_taps, select_by_patterns, take_rows, unwrap

BLOCK_LISTS = ("transformer_blocks", "blocks", "single_transformer_blocks")
PERTURBABLE = ("self", "joint", "single")


@dataclass(frozen=True)
class TransformerLayerInfo(LayerInfo):
    """An attention layer of a transformer denoiser; ``kind`` is self, cross, joint or single."""

    kind: str = "self"
    linear: bool = False  # Sana's linear attention (no softmax map)


def is_transformer(model: torch.nn.Module) -> bool:
    """A diffusers transformer denoiser (as opposed to a U-Net)."""
    model = unwrap(model)
    return not hasattr(model, "down_blocks") and any(isinstance(getattr(model, n, None), torch.nn.ModuleList) for n in BLOCK_LISTS)


def denoiser(pipe) -> torch.nn.Module | None:
    """The pipeline's denoiser: ``pipe.unet`` or ``pipe.transformer``."""
    model = getattr(pipe, "unet", None)
    return model if model is not None else getattr(pipe, "transformer", None)


def _attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # older diffusers
        AttentionModuleMixin = Attention
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, (Attention, AttentionModuleMixin))}


def _main_list(model: torch.nn.Module) -> str:
    model = unwrap(model)
    for name in BLOCK_LISTS:
        if isinstance(getattr(model, name, None), torch.nn.ModuleList):
            return name
    raise ValueError(f"{type(model).__name__} has no transformer block list ({', '.join(BLOCK_LISTS)})")


def _kind(module: torch.nn.Module) -> str:
    if type(module).__name__ == "FluxAttention":
        return "joint" if getattr(module, "added_kv_proj_dim", None) is not None else "single"
    if getattr(module, "add_q_proj", None) is not None or getattr(module, "to_added_qkv", None) is not None:
        return "joint"
    return "cross" if getattr(module, "is_cross_attention", False) else "self"


def patch_size(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "patch_size", None) or 1)


def list_layers(model: torch.nn.Module) -> list[TransformerLayerInfo]:
    """All attention layers of a transformer denoiser in module order. ``is_cross`` is true for the
    cross-attention layers only; ``factor`` is the patch size (every layer sees the same token grid)."""
    factor = patch_size(model)
    layers = []
    for name, module in _attention_modules(model).items():
        kind = _kind(module)
        linear = "Linear" in type(getattr(module, "processor", None)).__name__
        layers.append(TransformerLayerInfo(name, kind == "cross", factor, int(module.heads), kind, linear))
    return layers


def _expand(model: torch.nn.Module, pattern) -> list[str]:
    model = unwrap(model)
    main = _main_list(model)
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        pattern = str(pattern)
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"pag_layers entries must be non-empty strings or block indices, got {pattern!r}")
    parts = pattern.strip().split(".")
    if parts[0].isdigit():
        parts = [main] + parts
    elif parts[0] == "mid":
        parts = [main, str(len(getattr(model, main)) // 2)] + parts[1:]
    elif parts[0] == "blocks" and main != "blocks":
        parts[0] = main
    elif parts[0] == "single":
        parts[0] = "single_transformer_blocks"
    return parts


def select_self_attention(model: torch.nn.Module, patterns) -> list[str]:
    """Names of the perturbable (self, joint, single-stream) attention layers selected by ``patterns``;
    ``ValueError`` listing the valid names when a pattern selects nothing or only cross-attention."""
    if isinstance(patterns, (str, int)):
        patterns = [patterns]
    patterns = list(patterns)
    layers = list_layers(model)
    self_layers = [lay.name for lay in layers if lay.kind in PERTURBABLE]
    cross_layers = [lay.name for lay in layers if lay.kind == "cross"]
    if not self_layers:
        raise ValueError("pag_layers: this transformer has no self-attention layers, so PAG cannot be applied")
    if not patterns:
        raise ValueError(f"pag_layers must name at least one layer; valid names: {', '.join(self_layers)}")
    return select_by_patterns(patterns, self_layers, cross_layers, lambda pattern: _expand(model, pattern))


def scfg_layers(model: torch.nn.Module, count: int = 4) -> list[tuple[str, str]]:
    """(self-attention record, cross-attention record) names of the layers S-CFG reads: ``count``
    blocks evenly spread over the middle third of the main block list (every block of a shallow model).
    Cross-attention models pair ``attn1`` with ``attn2`` of a block; joint-attention models read both
    maps from the one joint layer (record names ``<layer>:self`` / ``<layer>:cross``)."""
    layers = list_layers(model)
    main = _main_list(model)
    blocks = len(getattr(model, main))
    lo, hi = blocks // 3, max(blocks // 3 + 1, (2 * blocks + 2) // 3)
    span = list(range(lo, hi))
    if len(span) > count:
        span = [span[round(i * (len(span) - 1) / (count - 1))] for i in range(count)] if count > 1 else [span[len(span) // 2]]
    by_block: dict[str, list[TransformerLayerInfo]] = {}
    for lay in layers:
        parts = lay.name.split(".")
        if parts[0] == main and len(parts) > 1:
            by_block.setdefault(parts[1], []).append(lay)
    pairs = []
    for index in span:
        members = by_block.get(str(index), [])
        joint = [lay for lay in members if lay.kind == "joint"]
        cross = [lay for lay in members if lay.kind == "cross"]
        selfs = [lay for lay in members if lay.kind == "self"]
        if joint:
            pairs.append((joint[0].name + ":self", joint[0].name + ":cross"))
        elif cross and selfs:
            pairs.append((selfs[0].name, cross[0].name))
    if not pairs:
        raise ValueError("this transformer has no cross-attention or joint-attention layers, so S-CFG cannot segment the prompt")
    return pairs


# --- the projections each family's processor computes ---------------------------------------------------


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H·d) -> (B, H, L, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _attention_qkv(attn, hidden_states, context=None, rotary=None, rotate_key=True, values=False, norm_first=False):
    """q, k (and v) (B, H, L, d) as diffusers' ``Attention`` processors compute them (q/k norms per head,
    or over all features first when ``norm_first`` as Sana's processors do; HunyuanDiT's rotary embedding
    on queries, and on keys of self-attention)."""
    if context is None:
        context = hidden_states
    elif getattr(attn, "norm_cross", None):
        context = attn.norm_encoder_hidden_states(context)
    query, key = attn.to_q(hidden_states), attn.to_k(context)
    if norm_first:
        query = attn.norm_q(query) if attn.norm_q is not None else query
        key = attn.norm_k(key) if attn.norm_k is not None else key
    query, key = _heads(query, attn.heads), _heads(key, attn.heads)
    value = _heads(attn.to_v(context), attn.heads) if values else None
    if attn.norm_q is not None and not norm_first:
        query = attn.norm_q(query)
    if attn.norm_k is not None and not norm_first:
        key = attn.norm_k(key)
    if rotary is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        query = apply_rotary_emb(query, rotary)
        if rotate_key:
            key = apply_rotary_emb(key, rotary)
    return query, key, value


def _sd3_qkv(attn, hidden_states, encoder_hidden_states):
    """Image and text q, k, v (B, H, L, d) of SD3's joint attention (JointAttnProcessor2_0)."""
    image = _attention_qkv(attn, hidden_states, values=True)
    tq = _heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
    tk = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
    tv = _heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
    if getattr(attn, "norm_added_q", None) is not None:
        tq = attn.norm_added_q(tq)
    if getattr(attn, "norm_added_k", None) is not None:
        tk = attn.norm_added_k(tk)
    return image, (tq, tk, tv)


def _flux_qkv(attn, hidden_states, encoder_hidden_states, rotary, text_len: int):
    """Image and text q, k, v (B, H, L, d) of Flux attention, as FluxAttnProcessor computes them: text
    first, rotary over the whole [text ; image] sequence. Single-stream: ``hidden_states`` is that sequence."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, d)
    text = tuple(x[:, :, :text_len] for x in (q, k, v))
    image = tuple(x[:, :, text_len:] for x in (q, k, v))
    return image, text


def identity_image_rows(image, text) -> torch.Tensor:
    """Image-query rows of joint attention whose image→image block is the identity: each image token
    attends to itself and to the text tokens, softmax over those. Equal to scaled-dot-product attention
    over [image ; text] keys with −inf on the image×image block off its diagonal. (B, H, N, d)."""
    q, k, v = image
    _, tk, tv = text
    scale = q.shape[-1] ** -0.5
    own = (q * k).sum(-1, keepdim=True)
    logits = torch.cat([own, q @ tk.transpose(-1, -2)], dim=-1).float() * scale
    probs = logits.softmax(dim=-1).to(v.dtype)
    return probs[..., :1] * v + probs[..., 1:] @ tv


def _full_rows(q, image, text, text_first: bool) -> torch.Tensor:
    """Unperturbed attention of queries ``q`` over all [image ; text] keys (Flux: [text ; image])."""
    keys = (text[1], image[1]) if text_first else (image[1], text[1])
    values = (text[2], image[2]) if text_first else (image[2], text[2])
    return F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2))


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> (B, L, H·d)."""
    return x.transpose(1, 2).flatten(2)


def perturbed_joint(attn, kind: str, hidden_states, encoder_hidden_states, rotary, text_len: int | None):
    """The output of a joint / single-stream layer for the perturbed rows, in the layer's own format."""
    if type(attn).__name__ == "FluxAttention":
        if kind == "single":
            image, text = _flux_qkv(attn, hidden_states, None, rotary, text_len)
            out_text = _full_rows(text[0], image, text, text_first=True)
            out = torch.cat([out_text, identity_image_rows(image, text)], dim=2)
            return _merge(out).to(hidden_states.dtype)
        image, text = _flux_qkv(attn, hidden_states, encoder_hidden_states, rotary, encoder_hidden_states.shape[1])
        out_image = _merge(identity_image_rows(image, text)).to(hidden_states.dtype)
        out_text = _merge(_full_rows(text[0], image, text, text_first=True)).to(hidden_states.dtype)
        out_image = attn.to_out[1](attn.to_out[0](out_image))
        return out_image, attn.to_add_out(out_text)
    image, text = _sd3_qkv(attn, hidden_states, encoder_hidden_states)
    out_image = _merge(identity_image_rows(image, text)).to(hidden_states.dtype)
    out_text = _merge(_full_rows(text[0], image, text, text_first=False)).to(hidden_states.dtype)
    out_image = attn.to_out[1](attn.to_out[0](out_image))
    if not attn.context_pre_only:
        out_text = attn.to_add_out(out_text)
    return out_image, out_text


# --- the tap --------------------------------------------------------------------------------------------


def _rows(value, rows: slice, batch: int):
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    return value


class TransformerTap:
    """A tap around a transformer attention layer's own processor (which keeps doing the real, fused
    attention for the unperturbed rows). Its ``__call__`` names every argument diffusers' attention
    modules pass on (they drop keyword arguments a processor's signature does not name)."""

    def __init__(self, name: str, state: TapState, inner, kind: str, perturb: bool = False,
                 record: tuple[str, ...] = ()) -> None:
        self.name, self.state, self.inner, self.kind = name, state, inner, kind
        self.perturb, self.record = perturb, record
        self.accepts = set(inspect.signature(inner.__call__).parameters)

    def _inner(self, attn, hidden_states, encoder_hidden_states, attention_mask, extra):
        kwargs = {k: v for k, v in extra.items() if k in self.accepts and v is not None}
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 temb=None, **kwargs):
        extra = dict(kwargs, image_rotary_emb=image_rotary_emb, temb=temb)
        batch = hidden_states.shape[0]
        if self.record and self.state.record_branches:
            self._record(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        perturbed = self.state.rows(batch, ("perturbed",)) if self.perturb and "perturbed" in self.state.branches else []
        if not perturbed:
            return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, extra)
        start = perturbed[0].start  # the perturbed chunk is always last (guidance.BRANCH_ORDER)
        normal, ptb = slice(0, start), slice(start, batch)
        parts = []
        if start > 0:
            parts.append(self._inner(attn, hidden_states[normal], _rows(encoder_hidden_states, normal, batch),
                                     _rows(attention_mask, normal, batch), {k: _rows(v, normal, batch) for k, v in extra.items()}))
        if self.kind == "self":
            parts.append(identity_attention(attn, hidden_states[ptb]))
        else:
            parts.append(perturbed_joint(attn, self.kind, hidden_states[ptb], _rows(encoder_hidden_states, ptb, batch),
                                         image_rotary_emb, self.state.text_len))
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(pair) for pair in zip(*parts))
        return torch.cat(parts)

    def _record(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary) -> None:
        """q/k of the image rows (``self``) and head-averaged text probabilities (``cross``) of the
        recorded branches, from the layer's own projections."""
        batch = hidden_states.shape[0]
        rows = self.state.rows(batch, self.state.record_branches)
        hs = take_rows(hidden_states, rows)
        if self.kind == "joint":
            if type(attn).__name__ == "FluxAttention":
                ehs = take_rows(encoder_hidden_states, rows)
                image, text = _flux_qkv(attn, hs, ehs, rotary, ehs.shape[1])
            else:
                image, text = _sd3_qkv(attn, hs, take_rows(encoder_hidden_states, rows))
            q, k, tk = image[0].float(), image[1].float(), text[1].float()
            scale = q.shape[-1] ** -0.5
            self.state.records[self.name + ":self"] = SelfRecord(q, k, scale)
            self.state.records[self.name + ":cross"] = (q @ tk.transpose(-1, -2) * scale).softmax(-1).mean(1)
            return
        norm_first = type(self.inner).__name__.startswith("Sana")
        if self.kind == "self":
            q, k, _ = _attention_qkv(attn, hs, rotary=rotary, rotate_key=True, norm_first=norm_first)
            if "Linear" in type(self.inner).__name__:  # Sana: relu feature maps, row-normalised (no softmax)
                self.state.records[self.name] = SelfRecord(F.relu(q).float(), F.relu(k).float(), 1.0, linear=True)
            else:
                self.state.records[self.name] = SelfRecord(q.float(), k.float(), attn.scale)
            return
        context = take_rows(encoder_hidden_states, rows)
        q, k, _ = _attention_qkv(attn, hs, context, rotary=rotary, rotate_key=False, norm_first=norm_first)
        logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            logits = logits + take_rows(mask, rows).float()
        self.state.records[self.name] = logits.softmax(dim=-1).mean(dim=1)  # (rows, N, T)


@contextlib.contextmanager
def transformer_taps(model: torch.nn.Module, perturb=(), record=(), state: TapState | None = None) -> Iterator[TapState]:
    """Install taps on the named layers of a transformer for the block; always restore.

    perturb: layer names (``select_self_attention``); record: (self, cross) record names (``scfg_layers``).
    """
    state = state or TapState()
    state.text_len = None
    modules = _attention_modules(model)
    kinds = {lay.name: lay.kind for lay in list_layers(model)}
    plan: dict[str, dict] = {}
    for name in perturb:
        plan.setdefault(name, {})["perturb"] = True
    for pair in record:
        for entry in pair:
            layer = entry.split(":")[0]
            plan.setdefault(layer, {}).setdefault("record", ())
            if entry not in plan[layer]["record"]:
                plan[layer]["record"] += (entry,)
    unknown = [n for n in plan if n not in modules]
    if unknown:
        raise ValueError(f"no attention layer named {unknown}; valid names: {', '.join(modules)}")
    originals = {name: modules[name].processor for name in plan}
    handles = []

    def text_length(module, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        state.text_len = ehs.shape[1] if torch.is_tensor(ehs) else None

    try:
        if any(kinds[n] == "single" for n in plan):
            # Flux's single-stream attention sees one [text ; image] sequence; its block knows the split.
            for block in getattr(unwrap(model), "single_transformer_blocks", []):
                handles.append(block.register_forward_pre_hook(text_length, with_kwargs=True))
        for name, options in plan.items():
            modules[name].set_processor(TransformerTap(name, state, originals[name], kinds[name], **options))
        yield state
    finally:
        restore_taps(handles, modules, originals, state)
