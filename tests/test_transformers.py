"""attnguide.engine.guide on transformer denoisers (SD3, PixArt-Σ, HunyuanDiT, Sana, Flux), tiny random models.

Equality with diffusers' PAG pipeline classes where their perturbation is ours, PAG at s = 0 = the plain
pipeline on every family (Flux included), S-CFG masks, layer selection, restoration after an exception,
Flux's refusals, and the joint-attention perturbation / S-CFG maps against explicit float64 references.
Everything is built from configs with the project's offline word tokenizer; latents are compared
(``output_type="latent"``), so no VAE decoding runs.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import pipeline_from

from attnguide import attention
from attnguide import transformer_attention as tx
from attnguide.engine import guide
from attnguide.evaluation.tiny_transformers import FAMILIES as PACKAGE_FAMILIES
from attnguide.evaluation.tiny_transformers import TransformerFamily, pixart_transformer, sd3_components, sd3_transformer

PROMPT = "a red circle on a gray background"
STEPS = 2
PAG_SCALE = 2.0



# --- families ---------------------------------------------------------------------------------------------


def _init_image():
    from PIL import Image

    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


# The package's families (shared with the benchmark) plus SD3's img2img, which takes an init image.
SD3_IMG2IMG = TransformerFamily("sd3-img2img", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3PAGImg2ImgPipeline",
                                sd3_components, "blocks.1", {"max_sequence_length": 8, "strength": 0.9})
FAMILIES = [PACKAGE_FAMILIES["sd3"], SD3_IMG2IMG, *(f for n, f in PACKAGE_FAMILIES.items() if n != "sd3")]
BY_NAME = {f.name: f for f in FAMILIES}
WITH_PEER = [f for f in FAMILIES if f.pag_pipeline]


def ids(families):
    return [f.name for f in families]


@functools.lru_cache(maxsize=None)
def _components(name: str) -> dict:
    return BY_NAME[name].build()




def plain(family: TransformerFamily):
    return pipeline_from(family.pipeline, _components(family.name))


def peer(family: TransformerFamily):
    return pipeline_from(family.pag_pipeline, _components(family.name), pag_applied_layers=[family.pag_layers])


def inputs(family: TransformerFamily) -> dict:
    """The family's call arguments (img2img: with a fresh init image)."""
    return dict(family.call_kwargs, **({"image": _init_image()} if "img2img" in family.name else {}))


def call(pipe, family: TransformerFamily, w: float, seed: int = 0, **kw) -> np.ndarray:
    args = dict(inputs(family), prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=w, height=family.size,
                width=family.size, generator=torch.Generator().manual_seed(seed), output_type="latent")
    args.update(kw)
    return pipe(**args).images.detach().float().numpy()


# --- 1. equality with diffusers' PAG pipelines ----------------------------------------------------------


@pytest.mark.parametrize("method,w", [("pag", 1.0), ("cfg+pag", 5.0)])
@pytest.mark.parametrize("family", WITH_PEER, ids=ids(WITH_PEER))
def test_equals_diffusers_pagpipeline_from(family, method, w):
    if family.name == "hunyuan-dit" and method == "pag":
        pytest.skip("diffusers' HunyuanDiTPAGPipeline fails without CFG: it repeats its time ids and style 3x for a 2x batch")
    pipe = plain(family)
    gaps = []  # |ε_c − ε_p|: the perturbation really acts
    with guide(pipe, method, pag_scale=PAG_SCALE, pag_layers="mid",
               callback=lambda s: gaps.append(float((s.predictions["cond"] - s.predictions["perturbed"]).abs().max()))) as run:
        ours = call(pipe, family, w, seed=3)
    reference = call(peer(family), family, w, seed=3, pag_scale=PAG_SCALE)
    assert run.branches_per_step == [(("uncond",) if w > 1 else ()) + ("cond", "perturbed")] * STEPS
    assert len(gaps) == STEPS and min(gaps) > 1e-3
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


# --- 2. PAG at s = 0 is the plain pipeline, every family ---------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES, ids=ids(FAMILIES))
def test_pag_scale_zero_equals_the_plainpipeline_from(family):
    pipe = plain(family)
    method, w = ("pag", 3.5) if family.name == "flux" else ("cfg+pag", 5.0)
    reference = call(pipe, family, w, seed=5)
    with guide(pipe, method, pag_scale=0.0) as run:
        ours = call(pipe, family, w, seed=5)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    assert run.branches_per_step == [("cond",) if family.name == "flux" else ("uncond", "cond")] * STEPS
    with guide(pipe, method, pag_scale=PAG_SCALE) as run:
        guided = call(pipe, family, w, seed=5)
    assert np.isfinite(guided).all() and np.abs(guided - reference).max() > 1e-4
    assert run.branches_per_step[0][-1] == "perturbed"


# --- 3. S-CFG masks ---------------------------------------------------------------------------------------

SCFG_FAMILIES = [BY_NAME[n] for n in ("sd3", "sd3-img2img", "pixart-sigma", "hunyuan-dit", "sana")]


@pytest.mark.parametrize("family", SCFG_FAMILIES, ids=ids(SCFG_FAMILIES))
def test_scfg_returns_masks(family):
    pipe = plain(family)
    rates = []
    with guide(pipe, "scfg+pag", pag_scale=PAG_SCALE, return_masks=True, callback=lambda s: rates.append(s.rate)) as run:
        out = call(pipe, family, 5.0, seed=8)
    assert np.isfinite(out).all()
    assert run.masks is not None and sorted(run.masks.steps) == list(range(STEPS))
    grid = family.size // pipe.vae_scale_factor // tx.patch_size(pipe.transformer)
    for labels, foreground in run.masks.steps.values():
        assert labels.shape == (1, grid, grid) and foreground.shape == labels.shape and foreground.dtype == torch.bool
    assert len(rates) == STEPS and all(r.shape[-2:] == (out.shape[-2], out.shape[-1]) for r in rates)
    assert all(float(r.min()) >= 0.8 - 1e-6 and float(r.max()) <= 3.0 + 1e-6 for r in rates)
    assert run.masks.tokens[0][:2] == ["<start>", "a"]


@pytest.mark.parametrize("name", ["sd3", "pixart-sigma"])
def test_scfg_with_unit_rate_is_cfg(name):
    family = BY_NAME[name]
    pipe = plain(family)
    reference = call(pipe, family, 5.0, seed=9)
    with guide(pipe, "scfg", scfg={"rate_min": 1.0, "rate_max": 1.0}):
        ours = call(pipe, family, 5.0, seed=9)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


def test_scfg_refuses_levels():
    with pytest.raises(ValueError, match="levels"):
        with guide(plain(BY_NAME["sd3"]), "scfg", scfg={"levels": (4, 8)}):
            pytest.fail("the block must not run")


# --- 4. layer listing and selection ----------------------------------------------------------------------


def test_layer_selection_matches_components_exactly():
    model = sd3_transformer(num_layers=11)
    layers = attention.list_layers(model)  # what `attnguide layers` prints
    assert [lay.name for lay in layers] == [f"transformer_blocks.{i}.attn" for i in range(11)]
    assert all(lay.kind == "joint" and not lay.is_cross and lay.factor == 1 and lay.heads == 2 for lay in layers)
    for pattern in ("transformer_blocks.1", "blocks.1", "1", "transformer_blocks.1.attn"):
        assert attention.select_self_attention(model, pattern) == ["transformer_blocks.1.attn"]
    assert attention.select_self_attention(model, "mid") == ["transformer_blocks.5.attn"]
    assert attention.select_self_attention(model, ["blocks.1*"]) == ["transformer_blocks.1.attn", "transformer_blocks.10.attn"]
    with pytest.raises(ValueError, match=r"matches no self-attention layer\. Valid names: transformer_blocks\.0\.attn"):
        attention.select_self_attention(model, "transformer_blocks.11")


def test_layer_kinds_per_family():
    kinds = {name: {lay.name: lay.kind for lay in tx.list_layers(_components(name)["transformer"])}
             for name in ("pixart-sigma", "hunyuan-dit", "sana", "flux")}
    assert kinds["pixart-sigma"]["transformer_blocks.1.attn1"] == "self"
    assert kinds["pixart-sigma"]["transformer_blocks.1.attn2"] == "cross"
    assert kinds["hunyuan-dit"]["blocks.2.attn1"] == "self" and kinds["hunyuan-dit"]["blocks.2.attn2"] == "cross"
    assert kinds["sana"]["transformer_blocks.0.attn1"] == "self" and kinds["sana"]["transformer_blocks.0.attn2"] == "cross"
    assert kinds["flux"] == {"transformer_blocks.0.attn": "joint", "transformer_blocks.1.attn": "joint",
                             "single_transformer_blocks.0.attn": "single", "single_transformer_blocks.1.attn": "single"}
    pixart = _components("pixart-sigma")["transformer"]
    assert tx.select_self_attention(pixart, "transformer_blocks.1") == ["transformer_blocks.1.attn1"]
    with pytest.raises(ValueError, match="cross-attention"):
        tx.select_self_attention(pixart, "transformer_blocks.1.attn2")
    flux = _components("flux")["transformer"]
    assert tx.select_self_attention(flux, ["single.1", "0"]) == ["single_transformer_blocks.1.attn", "transformer_blocks.0.attn"]


@pytest.mark.parametrize("layers", [["single.0", "single.1"], ["0", "single.1"]], ids=["single-stream", "both"])
def test_flux_pag_on_single_stream_blocks(layers):
    family = BY_NAME["flux"]
    pipe = plain(family)
    reference = call(pipe, family, 3.5, seed=6)
    gaps = []
    with guide(pipe, "pag", pag_scale=PAG_SCALE, pag_layers=layers,
               callback=lambda s: gaps.append(float((s.predictions["cond"] - s.predictions["perturbed"]).abs().max()))):
        ours = call(pipe, family, 3.5, seed=6)
    assert min(gaps) > 1e-3 and np.isfinite(ours).all() and np.abs(ours - reference).max() > 1e-4


# --- 5. Flux: true CFG batched into one call, S-CFG on packed tokens, what is refused ----------------------


class RowCounter:
    """Rows of every call of ``module`` (a forward pre-hook): on the denoiser, its calls as the pipeline
    makes them; on its first block, its real evaluations."""

    def __init__(self, module) -> None:
        self.rows: list[int] = []
        self.handle = module.register_forward_pre_hook(
            lambda module, args, kwargs: self.rows.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
            with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _evaluations(model) -> RowCounter:
    """Rows of every real evaluation of a transformer (its first block runs once per evaluation)."""
    return RowCounter(model.transformer_blocks[0])


def _assert_unpatched(pipe) -> None:
    model = pipe.transformer
    assert "forward" not in vars(model) and "progress_bar" not in vars(pipe) and "encode_prompt" not in vars(pipe)
    assert not any(type(p).__name__ == "TransformerTap" for p in model.attn_processors.values())
    assert not any(m._forward_pre_hooks for m in model.modules() if m is not model)


TRUE_CFG = {"negative_prompt": "", "true_cfg_scale": 4.0}


@pytest.mark.parametrize("method,kwargs", [("cfg", {}), ("cfg+pag", {"pag_scale": 0.0}),
                                            ("scfg", {"scfg": {"rate_min": 1.0, "rate_max": 1.0}})])
def test_flux_true_cfg_in_one_call_equals_the_plain_pipeline(method, kwargs):
    """Flux runs its negative prompt as a second transformer call; the engine batches it into the first
    (2 rows, one evaluation per step) and answers the second call from it: the plain pipeline's true CFG."""
    family = BY_NAME["flux"]
    pipe = plain(family)
    reference = call(pipe, family, 3.5, seed=2, **TRUE_CFG)
    with _evaluations(pipe.transformer) as evaluations, guide(pipe, method, **kwargs) as run:
        ours = call(pipe, family, 3.5, seed=2, **TRUE_CFG)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    assert evaluations.rows == [2] * STEPS and run.branches_per_step == [("uncond", "cond")] * STEPS
    _assert_unpatched(pipe)


def test_flux_scfg_pag_returns_masks_on_the_token_grid():
    family = BY_NAME["flux"]
    pipe = plain(family)
    rates = []
    with _evaluations(pipe.transformer) as evaluations:
        with guide(pipe, "scfg+pag", pag_scale=PAG_SCALE, return_masks=True, callback=lambda s: rates.append(s.rate)) as run:
            out = call(pipe, family, 3.5, seed=8, **TRUE_CFG)
    assert np.isfinite(out).all() and evaluations.rows == [3] * STEPS
    grid = family.size // pipe.vae_scale_factor // 2  # 2x2 latent patches are packed into one token
    assert sorted(run.masks.steps) == list(range(STEPS))
    assert all(labels.shape == (1, grid, grid) for labels, _ in run.masks.steps.values())
    assert run.masks.tokens[0][:3] == ["<start>", "a", "red"]  # the prompt's tokens, not the negative prompt's
    assert all(r.shape == (1, grid * grid, 1) and 0.8 - 1e-6 <= float(r.min()) <= float(r.max()) <= 3.0 + 1e-6 for r in rates)
    assert max(float(r.max() - r.min()) for r in rates) > 0  # regions really get different scales


@pytest.mark.parametrize("method,kwargs,match", [
    ("cfg", {}, "true_cfg_scale > 1 and a negative_prompt"),  # CFG asked, none given
    ("pag", TRUE_CFG, "true_cfg_scale=1"),  # true CFG given to a method without CFG
])
def test_flux_refuses_a_cfg_mismatch_before_evaluating(method, kwargs, match):
    family = BY_NAME["flux"]
    pipe = plain(family)
    with _evaluations(pipe.transformer) as evaluations:
        with pytest.raises(ValueError, match=match):
            with guide(pipe, method, pag_scale=PAG_SCALE):
                call(pipe, family, 3.5, **kwargs)
    assert evaluations.rows == []
    _assert_unpatched(pipe)


# --- 6. everything restored after an exception -------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _boom(info):
    if info.step == 1:
        raise Boom("stop")


@pytest.mark.parametrize("name,method,layers", [
    ("sd3", "scfg+pag", "mid"), ("flux", "pag", ["0", "single.1"]), ("flux", "scfg+pag", "mid"),
    ("pixart-sigma", "scfg+pag", "mid"),
])
def test_restored_after_an_exception(name, method, layers):
    family = BY_NAME[name]
    pipe = pipeline_from(family.pipeline, family.build())  # fresh: must not leak into the cached components
    model = pipe.transformer
    w = 3.5 if name == "flux" else 5.0
    extra = TRUE_CFG if name == "flux" and method != "pag" else {}
    before = call(pipe, family, w, seed=11, **extra)
    processors = dict(model.attn_processors)
    with _evaluations(model) as counter, pytest.raises(Boom):
        with guide(pipe, method, pag_layers=layers, callback=_boom, return_masks=method.startswith("scfg")):
            call(pipe, family, w, seed=11, **extra)
    assert len(counter.rows) == 2  # it raised in step 1, mid-denoising
    _assert_unpatched(pipe)
    after = model.attn_processors
    assert after.keys() == processors.keys() and all(after[k] is processors[k] for k in processors)
    np.testing.assert_array_equal(call(pipe, family, w, seed=11, **extra), before)


# --- 7. the joint-attention perturbation against explicit masked attention ------------------------------------


def _masked_reference_mask(text: int, image: int, text_first: bool) -> torch.Tensor:
    """diffusers' SD3 PAG mask: −inf on the image×image block except its diagonal (float64)."""
    n = text + image
    mask = torch.zeros(n, n, dtype=torch.float64)
    block = slice(text, n) if text_first else slice(0, image)
    sub = torch.full((image, image), float("-inf"), dtype=torch.float64)
    sub.fill_diagonal_(0)
    mask[block, block] = sub
    return mask


def test_identity_image_rows_equals_the_masked_softmax():
    g = torch.Generator().manual_seed(0)
    b, h, n, t, d = 2, 3, 10, 5, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    tq, tk, tv = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    ours = tx.identity_image_rows((q, k, v), (tq, tk, tv))
    keys, values = torch.cat([k, tk], 2).double(), torch.cat([v, tv], 2).double()
    logits = q.double() @ keys.transpose(-1, -2) / d ** 0.5 + _masked_reference_mask(t, n, text_first=False)[:n]
    reference = logits.softmax(-1) @ values
    torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["joint", "single"])
def test_flux_perturbation_equals_its_processor_with_the_mask(kind):
    model = _components("flux")["transformer"]
    block = model.transformer_blocks[0] if kind == "joint" else model.single_transformer_blocks[0]
    attn = block.attn
    g = torch.Generator().manual_seed(1)
    t, n, dim = 3, 16, model.inner_dim
    ids = torch.cat([torch.zeros(t, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.),
                                                                   indexing="ij"), -1).reshape(-1, 3)])
    rotary = model.pos_embed(ids)
    mask = _masked_reference_mask(t, n, text_first=True).float()[None, None]
    with torch.no_grad():
        if kind == "joint":
            hs, ehs = torch.randn(2, n, dim, generator=g), torch.randn(2, t, dim, generator=g)
            ours = tx.perturbed_joint(attn, kind, hs, ehs, rotary, None)
            reference = attn.processor(attn, hs, ehs, attention_mask=mask, image_rotary_emb=rotary)
        else:
            seq = torch.randn(2, t + n, dim, generator=g)
            ours = (tx.perturbed_joint(attn, kind, seq, None, rotary, t),)
            reference = (attn.processor(attn, seq, None, attention_mask=mask, image_rotary_emb=rotary),)
    for a, r in zip(ours, reference):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=0)


def test_sd3_perturbation_with_qk_norm_equals_the_masked_softmax():
    """SD3.5's RMS q/k norms are applied (diffusers' PAG processor skips them)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                                  pooled_projection_dim=64, out_channels=4, qk_norm="rms_norm", pos_embed_max_size=16)
    attn = model.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(2)
    hs, ehs = torch.randn(2, 12, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        out_image, out_text = tx.perturbed_joint(attn, "joint", hs, ehs, None, None)
        (q, k, v), (tq, tk, tv) = tx._sd3_qkv(attn, hs, ehs)
        queries = torch.cat([q, tq], 2).double()
        keys, values = torch.cat([k, tk], 2).double(), torch.cat([v, tv], 2).double()
        probs = (queries @ keys.transpose(-1, -2) / 8 ** 0.5 + _masked_reference_mask(5, 12, text_first=False)).softmax(-1)
        out = tx._merge((probs @ values).float())
        ref_image = attn.to_out[0](out[:, :12])
        ref_text = attn.to_add_out(out[:, 12:])
    torch.testing.assert_close(out_image, ref_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_text, ref_text, atol=1e-5, rtol=0)


# --- 8. S-CFG's maps on transformers against float64 explicit-softmax references ------------------------------


def _heads64(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _check_maps(records, self_name, cross_name, s_ref, c_ref):
    from attnguide import segmentation

    record, cross = records[self_name], records[cross_name]
    torch.testing.assert_close(cross.double(), c_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(segmentation.self_attention_map(record).double(), s_ref, atol=1e-5, rtol=0)
    powers, x = [], c_ref
    for _ in range(4):
        x = s_ref @ x
        powers.append(x)
    completed = segmentation.complete(cross, record, "paper", 4)
    torch.testing.assert_close(completed.double(), sum(powers) / 4, atol=1e-5, rtol=0)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_scfg_maps_of_joint_attention_equal_the_float64_joint_softmax(qk_norm):
    """Image-query rows of the joint softmax over [image ; text] keys; each block's rows renormalised per
    head, then averaged over heads: image→text = token maps, image→image = S̄ of the completion."""
    import copy

    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                                  pooled_projection_dim=64, out_channels=4, qk_norm=qk_norm, pos_embed_max_size=16)
    attn = model.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(3)
    n, t = 16, 6
    hs, ehs = torch.randn(3, n, 16, generator=g) * 2, torch.randn(3, t, 16, generator=g) * 2
    state = attention.TapState(branches=("uncond", "cond", "perturbed"), record_branches=("uncond", "cond"))
    tap = tx.TransformerTap("L", state, attn.processor, "joint", record=("L:self", "L:cross"))
    with torch.no_grad():
        tap._record(attn, hs, ehs, None, None)
        a = copy.deepcopy(attn).double()
        x, c = hs[:2].double(), ehs[:2].double()
        q, k = _heads64(a.to_q(x), 2), _heads64(a.to_k(x), 2)
        tk = _heads64(a.add_k_proj(c), 2)
        if qk_norm:
            q, k, tk = a.norm_q(q), a.norm_k(k), a.norm_added_k(tk)
        joint = (q @ torch.cat([k, tk], 2).transpose(-1, -2) / 8 ** 0.5).softmax(-1)  # (2, heads, n, n + t)
        image_block, text_block = joint[..., :n], joint[..., n:]
        s_ref = (image_block / image_block.sum(-1, keepdim=True)).mean(1)
        c_ref = (text_block / text_block.sum(-1, keepdim=True)).mean(1)
    _check_maps(state.records, "L:self", "L:cross", s_ref, c_ref)


def test_scfg_maps_of_cross_attention_equal_the_float64_softmax():
    """PixArt-Σ: attn1 (self) and attn2 (cross, with the text padding mask as PixArt passes it)."""
    import copy

    model = pixart_transformer()
    block = model.transformer_blocks[1]
    g = torch.Generator().manual_seed(4)
    n, t, dim = 16, 6, model.inner_dim
    hs, ehs = torch.randn(2, n, dim, generator=g), torch.randn(2, t, dim, generator=g)
    keep = torch.ones(2, t)
    keep[:, -2:] = 0
    bias = ((1 - keep) * -10000.0)[:, None]  # PixArt's encoder_attention_mask, as its forward converts it
    state = attention.TapState(branches=("cond", "perturbed"), record_branches=("cond",))
    self_tap = tx.TransformerTap("S", state, block.attn1.processor, "self", record=("S",))
    cross_tap = tx.TransformerTap("C", state, block.attn2.processor, "cross", record=("C",))
    with torch.no_grad():
        self_tap._record(block.attn1, hs, None, None, None)
        cross_tap._record(block.attn2, hs, ehs, bias, None)
        a1, a2 = copy.deepcopy(block.attn1).double(), copy.deepcopy(block.attn2).double()
        x, c = hs[:1].double(), ehs[:1].double()
        scale = (dim // 2) ** -0.5
        s_ref = (_heads64(a1.to_q(x), 2) @ _heads64(a1.to_k(x), 2).transpose(-1, -2) * scale).softmax(-1).mean(1)
        logits = _heads64(a2.to_q(x), 2) @ _heads64(a2.to_k(c), 2).transpose(-1, -2) * scale + bias[:1, None].double()
        c_ref = logits.softmax(-1).mean(1)
    assert float(c_ref[..., -2:].max()) < 1e-6  # the padding tokens are masked out
    _check_maps(state.records, "S", "C", s_ref, c_ref)


def test_scfg_self_map_of_sana_linear_attention_equals_float64():
    """Sana's attn1 is linear attention: its map is relu(q)·relu(k) normalised per row (what
    SanaLinearAttnProcessor2_0 applies to the values); S-CFG's completion uses that map."""
    import copy

    from attnguide import segmentation

    model = _components("sana")["transformer"]
    attn = model.transformer_blocks[1].attn1
    g = torch.Generator().manual_seed(5)
    n, dim = 16, model.config.num_attention_heads * model.config.attention_head_dim
    hs = torch.randn(2, n, dim, generator=g)
    state = attention.TapState(branches=("uncond", "cond"), record_branches=("uncond", "cond"))
    tap = tx.TransformerTap("S", state, attn.processor, "self", record=("S",))
    with torch.no_grad():
        tap._record(attn, hs, None, None, None)
        a = copy.deepcopy(attn).double()
        q, k = _heads64(a.to_q(hs.double()), 2).relu(), _heads64(a.to_k(hs.double()), 2).relu()
        scores = q @ k.transpose(-1, -2)
        s_ref = (scores / (scores.sum(-1, keepdim=True) + 1e-15)).mean(1)
        # the processor's own output is this map applied to the values
        v = _heads64(a.to_v(hs.double()), 2)
        out = a.to_out[0](tx._merge(scores / (scores.sum(-1, keepdim=True) + 1e-15) @ v))
        torch.testing.assert_close(attn.processor(attn, hs).double(), out, atol=1e-5, rtol=0)
    torch.testing.assert_close(segmentation.self_attention_map(state.records["S"]).double(), s_ref, atol=1e-5, rtol=0)


def test_sd3_skip_layer_guidance_is_refused_before_denoising():
    family = BY_NAME["sd3"]
    pipe = plain(family)
    with RowCounter(pipe.transformer) as counter:
        with pytest.raises(ValueError, match="skip_guidance_layers"):
            with guide(pipe, "cfg+pag", pag_scale=PAG_SCALE):
                call(pipe, family, 5.0, skip_guidance_layers=[1])
    assert counter.rows == []
    _assert_unpatched(pipe)


def test_pixart_reads_w_and_the_cfg_flag_from_its_call():
    """PixArt-Σ keeps w and its CFG flag in locals of __call__: both are read per call."""
    family = BY_NAME["pixart-sigma"]
    pipe = plain(family)
    reference = call(pipe, family, 3.0, seed=2)
    with guide(pipe, "cfg") as run:
        ours = call(pipe, family, 3.0, seed=2)
    assert run.branches_per_step == [("uncond", "cond")] * STEPS  # w = 3 was read (at w = 1 CFG adds no branch)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        with guide(pipe, "cfg"):
            call(pipe, family, 1.0)
    with guide(pipe, "pag", pag_scale=PAG_SCALE) as run:
        call(pipe, family, 1.0)
    assert run.branches_per_step == [("cond", "perturbed")] * STEPS


@pytest.mark.parametrize("name", ["sd3", "pixart-sigma"])
def test_two_images_per_prompt_equal_diffusers(name):
    family = BY_NAME[name]
    pipe = plain(family)
    with guide(pipe, "cfg+pag", pag_scale=PAG_SCALE) as run:
        ours = call(pipe, family, 5.0, seed=4, num_images_per_prompt=2)
    reference = call(peer(family), family, 5.0, seed=4, pag_scale=PAG_SCALE, num_images_per_prompt=2)
    assert ours.shape[0] == 2 and run.unet_evaluations == 3 * STEPS
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


# --- generate() on transformer pipelines ------------------------------------------------------------------

GENERATE_FAMILIES = [f for f in FAMILIES if f.name not in ("sd3-img2img", "flux")]


@pytest.mark.parametrize("family", GENERATE_FAMILIES, ids=ids(GENERATE_FAMILIES))
def test_generate_runs_every_method(family):
    from attnguide import METHODS, generate

    pipe = plain(family)
    extra = {k: v for k, v in inputs(family).items() if k not in ("image", "strength")}
    branches = {"none": 1, "cfg": 2, "pag": 2, "cfg+pag": 3, "scfg": 2, "scfg+pag": 3}
    for method in METHODS:
        out = generate(pipe, PROMPT, method=method, guidance_scale=5.0, pag_scale=2.0, num_inference_steps=STEPS,
                       height=family.size, width=family.size, seed=0, output_type="latent", progress=False,
                       return_masks=method.startswith("scfg"), pipeline_kwargs=extra)
        assert torch.isfinite(out.images).all(), method
        assert out.unet_evaluations == STEPS * branches[method], method
        if method.startswith("scfg"):
            assert out.masks is not None and sorted(out.masks.steps) == list(range(STEPS)), method


def test_generate_on_flux_runs_every_method_with_true_cfg():
    from attnguide import METHODS, generate

    family = BY_NAME["flux"]
    pipe = plain(family)
    branches = {"none": 1, "cfg": 2, "pag": 2, "cfg+pag": 3, "scfg": 2, "scfg+pag": 3}
    for method in METHODS:
        with _evaluations(pipe.transformer) as evaluations:
            out = generate(pipe, PROMPT, method=method, guidance_scale=4.0, pag_scale=2.0, num_inference_steps=STEPS,
                           height=family.size, width=family.size, seed=0, output_type="latent", progress=False,
                           return_masks=method.startswith("scfg"), pipeline_kwargs=inputs(family))
        assert torch.isfinite(out.images).all(), method
        assert out.unet_evaluations == STEPS * branches[method] and evaluations.rows == [branches[method]] * STEPS, method
        if method.startswith("scfg"):
            assert out.masks is not None and sorted(out.masks.steps) == list(range(STEPS)), method
    # cfg through generate is the plain pipeline's true CFG with w as true_cfg_scale and "" as negative prompt
    ours = generate(pipe, PROMPT, method="cfg", guidance_scale=4.0, num_inference_steps=STEPS, height=family.size,
                    width=family.size, seed=0, output_type="latent", progress=False, pipeline_kwargs=inputs(family)).images
    reference = call(pipe, family, 1.0, seed=0, **TRUE_CFG)
    np.testing.assert_allclose(ours.float().numpy(), reference, atol=1e-5, rtol=0)


def test_layers_command_lists_transformer_layers(tmp_path):
    from click.testing import CliRunner

    from attnguide.cli import main

    sd3_transformer().save_pretrained(tmp_path / "transformer", safe_serialization=True)
    result = CliRunner().invoke(main, ["layers", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "transformer_blocks.1.attn" in result.output and "joint" in result.output
