"""S-CFG against a plain float64 reference written here (explicit softmax, explicit matrix powers)."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnguide import attention, generate, segmentation
from attnguide.segmentation import Segmentation, scfg_rate

W = 5.0


def explicit_attention(module, hidden, context):
    """Head-averaged attention probabilities in float64 with an explicit softmax."""
    m = copy.deepcopy(module).double()
    q, k = m.to_q(hidden.double()), m.to_k(context.double())
    b, n, _ = q.shape
    d = q.shape[-1] // m.heads
    q = q.view(b, n, m.heads, d).transpose(1, 2)
    k = k.view(b, -1, m.heads, d).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    p = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    return (p / p.sum(dim=-1, keepdim=True)).mean(dim=1)


def smooth64(x):
    k1 = torch.exp(-((torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / (2 * 0.5)) ** 2))
    k = torch.outer(k1, k1)
    k = (k / k.sum()).view(1, 1, 3, 3)
    b, c, h, w = x.shape
    y = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(y, k).reshape(b, c, h, w)


def reference_scfg(modules, captured, pairs, latent, preds, mode, power=4):
    """Steps 2-7 of S-CFG from captured layer inputs, all in float64."""
    token_sum, fore_sum = 0, 0
    finest = min(f for *_, f in pairs)
    target = (latent // finest, latent // finest)
    for self_name, cross_name, factor in pairs:
        hs = captured[self_name][0]
        hc, ctx = captured[cross_name]
        s_map = explicit_attention(modules[self_name], hs, hs)  # (B, N, N)
        c_map = explicit_attention(modules[cross_name], hc, ctx)  # (B, N, T)
        if mode == "reference":
            comp = (s_map @ c_map + 3 * (s_map @ s_map) @ c_map) / 4
        else:
            comp = sum(torch.linalg.matrix_power(s_map, r) @ c_map for r in range(1, power + 1)) / power
        side = latent // factor
        maps = comp.transpose(1, 2).reshape(comp.shape[0], -1, side, side)
        if (side, side) != target:
            maps = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
        maps = smooth64(maps)
        token_sum = token_sum + maps / (maps.mean(dim=(2, 3), keepdim=True) + 1e-8)
        fore = torch.stack([maps[:, 0], maps[:, 1:].sum(1)], 1)
        fore_sum = fore_sum + fore / fore.mean(dim=(2, 3), keepdim=True)
    token = token_sum / len(pairs)
    fore = fore_sum / len(pairs)
    # Captured batch rows are (uncond, cond): tokens from cond; foreground from uncond in
    # reference mode and from cond in paper mode.
    token = token[1:2]
    fore = fore[0:1] if mode == "reference" else fore[1:2]
    masks = (token == token.amax(1, keepdim=True)).double()
    fg = 1.0 - (fore == fore.amax(1, keepdim=True)).double()[:, :1]
    up_masks = F.interpolate(masks, size=(latent, latent), mode="nearest")
    up_fg = F.interpolate(fg, size=(latent, latent), mode="nearest")
    uncond, cond = preds["uncond"].double(), preds["cond"].double()
    norm = (cond - uncond).norm(dim=1, keepdim=True)
    region = (norm * up_masks).sum((2, 3)) / (up_masks.sum((2, 3)) + 1e-8)
    fnorm = (norm * up_fg).sum((2, 3)) / (up_fg.sum((2, 3)) + 1e-8)
    rate = fnorm * (up_masks.sum((2, 3)) > 0).double() / (region + 1e-8)
    rate = (rate[..., None, None] * up_masks).sum(1, keepdim=True).clamp(0.8, 3.0).clamp(max=15.0 / W)
    rate = smooth64(rate)
    return token, fg, rate, uncond + W * rate * (cond - uncond)


@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_fast_path_equals_float64_reference(sd_pipe, mode):
    unet = sd_pipe.unet
    levels = attention.default_scfg_levels(unet)
    factors = {lay.name: lay.factor for lay in attention.list_layers(unet)}
    pairs = [(s, c, factors[c]) for s, c in attention.scfg_layers(unet, levels)]
    assert len(pairs) == 4  # down_blocks.1, up_blocks.1 x2 (factor 2) and the mid block (factor 4)
    modules = dict(unet.named_modules())
    captured = {}

    def capture(name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            captured[name] = (hidden.detach().clone(), None if context is None else context.detach().clone())
        return hook

    hooks = [modules[n].register_forward_pre_hook(capture(n), with_kwargs=True) for p in pairs for n in p[:2]]
    checked = []

    def compare(info):
        token, fg, rate, guided = reference_scfg(modules, captured, pairs, 16, info.predictions, mode)
        seg = info.segmentation
        torch.testing.assert_close(seg.scores.double(), token, rtol=1e-4, atol=1e-4)
        margin = token.sort(dim=1, descending=True).values
        clear = (margin[:, 0] - margin[:, 1]) > 1e-3  # pixels without a near-tie
        assert torch.equal(seg.token_masks[:, :, clear[0]], (token == token.amax(1, keepdim=True))[:, :, clear[0]])
        assert torch.equal(seg.foreground.double(), fg)
        torch.testing.assert_close(info.rate.double(), rate, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(info.guided.double(), guided, rtol=1e-4, atol=1e-4)
        checked.append(info.step)

    try:
        generate(sd_pipe, "a red circle and a blue square", method="scfg", guidance_scale=W, num_inference_steps=3,
                 seed=0, scfg={"mode": mode}, callback=compare, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert checked == [0, 1, 2]


def test_rate_is_finite_for_empty_regions_and_zero_difference():
    masks = torch.zeros(1, 5, 4, 4, dtype=torch.bool)
    masks[:, 2] = True  # one token owns everything, the others are empty
    seg = Segmentation(masks, torch.zeros(1, 1, 4, 4, dtype=torch.bool), torch.rand(1, 5, 4, 4))
    same = torch.randn(1, 4, 8, 8)
    for dtype in (torch.float32, torch.float16):
        rate = scfg_rate(same.to(dtype), same.to(dtype), seg, 7.5)
        assert torch.isfinite(rate).all()
        torch.testing.assert_close(rate, torch.full_like(rate, 0.8))  # clamped from 0, smoothed constant


def test_rate_equalises_regions():
    # Two regions whose guidance differences differ by 4x: the weaker one gets the larger rate.
    masks = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    masks[0, 1, :, :1] = True
    masks[0, 2, :, 1:] = True
    fg = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    seg = Segmentation(masks, fg, torch.rand(1, 3, 2, 2))
    uncond = torch.zeros(1, 1, 4, 4)
    cond = torch.cat([torch.full((1, 1, 4, 2), 1.0), torch.full((1, 1, 4, 2), 4.0)], dim=-1)
    rate = scfg_rate(uncond, cond, seg, 1.0, smoothing=False)
    # foreground mean 2.5; rates 2.5/1 and 2.5/4 -> 2.5 and 0.625, clamped to 0.8
    torch.testing.assert_close(rate[0, 0, 0], torch.tensor([2.5, 2.5, 0.8, 0.8]))


def test_self_attention_completion_matches_matrix_form():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 4, generator=g), torch.randn(2, 3, 10, 4, generator=g)
    record = attention.SelfRecord(q, k, 0.5)
    c = torch.rand(2, 10, 6, generator=g)
    s = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1).mean(1)
    torch.testing.assert_close(segmentation.complete(c, record, "reference", 4), (s @ c + 3 * s @ s @ c) / 4)
    expected = sum(torch.linalg.matrix_power(s, r) @ c for r in range(1, 4)) / 3
    torch.testing.assert_close(segmentation.complete(c, record, "paper", 3), expected)


def test_overlay_has_legend():
    labels = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [3, 3, 3, 3], [3, 3, 3, 3]])
    img = segmentation.render_overlay(labels, ["<start>", "a", "red", "circle"], size=128)
    assert img.size == (128, 128 + 3 * 14 + 4)
    arr = np.asarray(img)
    assert tuple(arr[10, 10]) != tuple(arr[10, 100])  # different tokens, different colours


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (4, 4), (8, 12), (1, 5)])
def test_resample_equals_interpolate_then_smooth(size):
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    interpolated = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(segmentation.resample(x, size, smoothing=False), interpolated, rtol=0, atol=1e-12)
    if min(size) > 1:  # reflect padding needs two pixels; a single row or column is replicated
        torch.testing.assert_close(segmentation.resample(x, size, smoothing=True), smooth64(interpolated), rtol=0, atol=1e-12)
    else:
        k = segmentation.gaussian_kernel_1d()
        expected = F.conv1d(F.pad(interpolated.reshape(-1, 1, size[1]), (1, 1), mode="reflect"), k.view(1, 1, 3))
        torch.testing.assert_close(segmentation.resample(x, size, smoothing=True), expected.view(interpolated.shape), rtol=0, atol=1e-12)
