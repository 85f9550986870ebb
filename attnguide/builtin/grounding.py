"""Grounding losses for training the built-in model: words that own their regions.

S-CFG segments the latent by the U-Net's cross-attention (refined by its self-attention). A model
trained on the diffusion loss alone is free to read the caption through any token; the built-in
model's causal caption encoder made every ``<pad>`` a summary of the whole caption, and the pads
owned the objects. Three terms, on the head-averaged attention probabilities of every
cross-attention layer (and the self-attention of the same blocks), use the scene's ground truth:

- token term (TokenCompose, Wang et al. CVPR 2024): for every token, 1 − (its attention mass
  inside its region) / (its total mass);
- pixel term: binary cross-entropy between each region's summed attention at a pixel (the sum over
  the tokens of that region) and the region's mask;
- self term: 1 − the self-attention mass a pixel keeps inside its own region.

Regions: every object is owned by the words naming it (size, colour, shape); every other token —
articles, relation and background words, ``<end>`` and the pads — is trained towards the
background, so under S-CFG's argmax over all token positions only object words can win object
pixels. ``<start>`` is left free: it is S-CFG's foreground reference.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from ..attention import list_layers, processor_input, processor_output

EPS = 1e-6


class _RecordingProcessor:
    """Explicit-softmax attention (differentiable) that keeps the head-averaged probabilities."""

    def __init__(self, name: str, store: dict[str, torch.Tensor]) -> None:
        self.name = name
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        hidden_states, residual, shape = processor_input(attn, hidden_states, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
        self.store[self.name] = probs.view(b, attn.heads, *probs.shape[1:]).mean(dim=1)
        out = attn.batch_to_head_dim(probs @ v)
        return processor_output(attn, out, residual, shape)


@contextlib.contextmanager
def recording(unet: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Install recording processors on every attention layer; restore the originals on exit."""
    original = unet.attn_processors
    store: dict[str, torch.Tensor] = {}
    processors = {f"{info.name}.processor": _RecordingProcessor(info.name, store) for info in list_layers(unet)}
    unet.set_attn_processor(processors)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


@dataclass
class Regions:
    """Ground truth of a batch at the latent grid.

    ``masks``: (B, R, H, W) soft region masks (region 0 the background, 1.. the objects), summing
    to 1 at every pixel. ``token_region``: (B, T) region of every token, −1 for tokens left free
    (``<start>``) and for every token of a sample without grounding (the empty prompt).
    """

    masks: torch.Tensor
    token_region: torch.Tensor


def token_regions(object_words: list[tuple[tuple[int, ...], ...] | None], tokens: int) -> torch.Tensor:
    """(B, T) region index of every token: object k's words -> k + 1 (token = word + 1, after
    ``<start>``), every other token but ``<start>`` -> 0; None (no grounding) -> all −1."""
    out = torch.zeros(len(object_words), tokens, dtype=torch.long)
    for b, groups in enumerate(object_words):
        if groups is None:
            out[b] = -1
            continue
        out[b, 0] = -1
        for k, words in enumerate(groups):
            for w in words:
                if w + 1 < tokens:
                    out[b, w + 1] = k + 1
    return out


def _masks_at(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return masks if masks.shape[-2:] == hw else F.adaptive_avg_pool2d(masks, hw)


def layer_losses(cross: torch.Tensor, self_probs: torch.Tensor | None, regions: Regions) -> dict[str, torch.Tensor]:
    """Per-sample token, pixel and self terms of one block.

    ``cross``: (B, N, T) head-averaged cross-attention probabilities on an h×w grid (N = hw);
    ``self_probs``: (B, N, N) head-averaged self-attention of the same block, or None.
    Returns tensors of shape (B,); samples without grounding get 0.
    """
    b, n, t = cross.shape
    side = int(round(n**0.5))
    masks = _masks_at(regions.masks.to(cross.dtype), (side, side)).flatten(2)  # (B, R, N)
    r = masks.shape[1]
    tr = regions.token_region
    active = tr >= 0  # (B, T)
    onehot = F.one_hot(tr.clamp(min=0), r).to(cross.dtype) * active[..., None]  # (B, T, R)
    token_mask = onehot @ masks  # (B, T, N): each token's own region
    mass = cross.sum(dim=1)  # (B, T)
    inside = (cross * token_mask.transpose(1, 2)).sum(dim=1)
    token_term = ((1 - inside / (mass + EPS)) * active).sum(dim=1) / active.sum(dim=1).clamp(min=1)

    region_sum = cross @ onehot  # (B, N, R): attention of each region's tokens at each pixel
    has_tokens = onehot.sum(dim=1) > 0  # (B, R)
    bce = F.binary_cross_entropy(region_sum.clamp(EPS, 1 - EPS).float(), masks.transpose(1, 2).float(), reduction="none")
    pixel_term = (bce.mean(dim=1) * has_tokens).sum(dim=1) / has_tokens.sum(dim=1).clamp(min=1)

    grounded = active.any(dim=1).to(cross.dtype)
    self_term = torch.zeros_like(grounded)
    if self_probs is not None:
        same_region = masks.transpose(1, 2) @ masks  # (B, N, N): probability two pixels share a region
        self_term = (1 - (self_probs * same_region).sum(dim=-1)).mean(dim=1) * grounded
    return {"token": token_term, "pixel": pixel_term.to(cross.dtype), "self": self_term}


def grounding_losses(store: dict[str, torch.Tensor], regions: Regions) -> dict[str, torch.Tensor]:
    """Per-sample terms averaged over every cross-attention layer that has recorded maps.

    The self term uses the self-attention (``attn1``) of the same transformer block."""
    totals: dict[str, torch.Tensor] = {}
    count = 0
    for name, cross in store.items():
        if not name.endswith("attn2"):
            continue
        terms = layer_losses(cross, store.get(name[: -len("attn2")] + "attn1"), regions)
        for key, value in terms.items():
            totals[key] = totals.get(key, 0) + value
        count += 1
    if count == 0:
        raise ValueError("the U-Net has no cross-attention layer named '...attn2' to ground")
    return {key: value / count for key, value in totals.items()}
