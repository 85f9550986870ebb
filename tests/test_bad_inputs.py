"""Bad inputs of ``generate`` and ``guide``: each is rejected before any U-Net call, with an error
whose message names the parameter, and leaves the pipeline as it was. Also: numpy/torch scalars are
accepted, the configurable ``Limits``, and non-finite values raise ``NonFiniteError``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import sd_components
from PIL import Image

import attnguide
from attnguide import Limits, NonFiniteError, generate, guide

STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline(**sd_components())
    p.set_progress_bar_config(disable=True)
    return p


def _state(p) -> dict:
    """What must not change when a call is refused."""
    return {
        "pipe_attrs": {k: id(v) for k, v in vars(p).items()},
        "unet_attrs": sorted(vars(p.unet)),
        "processors": {k: id(v) for k, v in p.unet.attn_processors.items()},
        "scheduler": dict(p.scheduler.config),
        "timesteps": p.scheduler.timesteps.clone(),
        "conv_in_hooks": len(p.unet.conv_in._forward_pre_hooks),
    }


def _assert_same(before: dict, after: dict) -> None:
    for key in before:
        if torch.is_tensor(before[key]):
            assert torch.equal(before[key], after[key]), key
        else:
            assert before[key] == after[key], key


def _refused(p, call, error, name):
    """``call()`` raises ``error`` naming ``name`` with no U-Net call and no change to ``p``."""
    calls = []
    before = _state(p)
    hook = p.unet.conv_in.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error) as info:
            call()
    finally:
        hook.remove()
    assert calls == [], "the U-Net ran before the input was refused"
    _assert_same(before, _state(p))
    message = str(info.value)
    assert name in message, f"{name!r} not named in: {message}"
    return message


GRAY = Image.new("RGB", (32, 32), (128, 128, 128))

# (kwargs of generate, expected error type, the parameter name the message must name)
GENERATE_CASES = [
    (dict(method="magic"), ValueError, "method"),
    (dict(method=""), ValueError, "method"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(guidance_scale=float("inf")), ValueError, "guidance_scale"),
    (dict(guidance_scale=1e300), ValueError, "guidance_scale"),
    (dict(method="scfg+pag", guidance_scale=1e300), ValueError, "guidance_scale"),
    (dict(guidance_scale=1e4), ValueError, "guidance_scale"),
    (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
    (dict(guidance_scale="7"), TypeError, "guidance_scale"),
    (dict(guidance_scale=True), TypeError, "guidance_scale"),
    (dict(guidance_scale=1.0), ValueError, "guidance_scale"),
    (dict(method="none", guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(method="pag", guidance_scale=1.0, pag_scale=1e6), ValueError, "pag_scale"),
    (dict(method="pag", guidance_scale=1.0, pag_scale=-1.0), ValueError, "pag_scale"),
    (dict(pag_scale=float("nan")), ValueError, "pag_scale"),
    (dict(pag_scale=np.array([1.0, 2.0])), TypeError, "pag_scale"),
    (dict(pag_layers="nomatch"), ValueError, "pag_layers"),
    (dict(method="pag", guidance_scale=1.0, pag_layers="nomatch"), ValueError, "pag_layers"),
    (dict(pag_layers=5), TypeError, "pag_layers"),
    (dict(method="cfg+pag", pag_layers="mid_block.attentions.0.transformer_blocks.0.attn2"), ValueError, "pag_layers"),
    (dict(cfg_window="01"), TypeError, "cfg_window"),
    (dict(cfg_window=(0.9, 1.0)), ValueError, "cfg_window"),
    (dict(cfg_window=(0.9, 0.1)), ValueError, "cfg_window"),
    (dict(cfg_window=(0.0, float("nan"))), ValueError, "cfg_window"),
    (dict(method="cfg+pag", pag_window=(0.8, 0.9)), ValueError, "pag_window"),
    (dict(pag_window=(-0.1, 1.0)), ValueError, "pag_window"),
    (dict(method="scfg", scfg={"cap": 0}), ValueError, "cap"),
    (dict(method="scfg", scfg={"smoothing": "no"}), TypeError, "smoothing"),
    (dict(method="scfg", scfg={"rate_max": 0}), ValueError, "rate_max"),
    (dict(method="scfg", scfg={"rate_min": 2.0, "rate_max": 1.0}), ValueError, "rate_min"),
    (dict(method="scfg", scfg={"power": 0}), ValueError, "power"),
    (dict(method="scfg", scfg={"power": 2.5}), TypeError, "power"),
    (dict(method="scfg", scfg={"levels": (3,)}), ValueError, "levels"),
    (dict(method="scfg", scfg={"levels": (64,)}), ValueError, "available levels"),
    (dict(method="cfg", scfg={"levels": (64,)}), ValueError, "available levels"),  # checked although cfg does not use it
    (dict(method="scfg", scfg={"mode": "fast"}), ValueError, "mode"),
    (dict(method="scfg", scfg={"bogus": 1}), ValueError, "scfg"),
    (dict(method="scfg", scfg="reference"), TypeError, "scfg"),
    (dict(method="cfg", scfg={"cap": 0}), ValueError, "cap"),  # checked although cfg does not use it
    (dict(num_inference_steps=True), TypeError, "num_inference_steps"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(num_inference_steps=2.0), TypeError, "num_inference_steps"),
    (dict(num_inference_steps=10**6), ValueError, "num_inference_steps"),
    (dict(num_images_per_prompt=10**6), ValueError, "num_images_per_prompt"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
    (dict(prompt=["a"] * 8, num_images_per_prompt=10), ValueError, "num_images_per_prompt"),
    (dict(height=8192, width=8192), ValueError, "height"),
    (dict(height=63), ValueError, "height"),
    (dict(width=0), ValueError, "width"),
    (dict(height="32"), TypeError, "height"),
    (dict(seed=True), TypeError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=2**32), ValueError, "seed"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed=2**70), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=[1, 2]), ValueError, "seed"),
    (dict(seed=2**32 - 1, num_images_per_prompt=2), ValueError, "seed"),
    (dict(seed=0, generator=torch.Generator()), ValueError, "seed"),
    (dict(generator=5), TypeError, "generator"),
    (dict(eta=float("nan")), ValueError, "eta"),
    (dict(eta=-5.0), ValueError, "eta"),
    (dict(clip_skip=100), ValueError, "clip_skip"),
    (dict(clip_skip=-1), ValueError, "clip_skip"),
    (dict(scheduler="bogus"), TypeError, "scheduler"),
    (dict(callback=5), TypeError, "callback"),
    (dict(method="none", guidance_scale=1.0, negative_prompt="blurry"), ValueError, "negative_prompt"),
    (dict(method="pag", guidance_scale=1.0, negative_prompt="blurry"), ValueError, "negative_prompt"),
    (dict(negative_prompt=["x", "y"]), ValueError, "negative_prompt"),
    (dict(negative_prompt=5), TypeError, "negative_prompt"),
    (dict(prompt=[]), ValueError, "prompt"),
    (dict(prompt=5), TypeError, "prompt"),
    (dict(output_type="jpeg"), ValueError, "output_type"),
    (dict(strength=0.0), ValueError, "strength"),
    (dict(strength=1.5), ValueError, "strength"),
    (dict(image=GRAY, strength=0.1), ValueError, "strength"),
    (dict(mask_image=GRAY), ValueError, "mask_image"),
    (dict(image="/nonexistent/picture.png"), ValueError, "image"),
    (dict(image=GRAY, height=32), ValueError, "height"),
    (dict(return_masks=True, mask_steps=[99]), ValueError, "mask_steps"),
    (dict(mask_steps="0"), TypeError, "mask_steps"),
    (dict(return_masks="yes"), TypeError, "return_masks"),
    (dict(guidance_rescale=2.0), ValueError, "guidance_rescale"),
    (dict(progress="no"), TypeError, "progress"),
    (dict(limits={"max_pixels": 0}), ValueError, "max_pixels"),
    (dict(limits={"bogus": 1}), ValueError, "limits"),
    (dict(limits=5), TypeError, "limits"),
    (dict(num_images_per_prompt=3, limits=Limits(max_images=2)), ValueError, "num_images_per_prompt"),
    (dict(guidance_scale=50.0, limits=Limits(max_scale=20)), ValueError, "guidance_scale"),
]


def _id(case) -> str:
    kwargs, error, name = case
    return f"{name}-{error.__name__}-" + ",".join(f"{k}={v!r}"[:24] for k, v in kwargs.items())


@pytest.mark.parametrize("kwargs,error,name", GENERATE_CASES, ids=[_id(c) for c in GENERATE_CASES])
def test_generate_refuses_bad_input_before_the_unet(pipe, kwargs, error, name):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "a red circle")
    kwargs.setdefault("method", "cfg")
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs = {"progress": False, "output_type": "np", **kwargs}
    _refused(pipe, lambda: generate(pipe, prompt, **kwargs), error, name)


GUIDE_CASES = [
    (dict(method="magic"), ValueError, "method"),
    (dict(pag_scale=1e6), ValueError, "pag_scale"),
    (dict(pag_scale=float("inf")), ValueError, "pag_scale"),
    (dict(cfg_window="01"), TypeError, "cfg_window"),
    (dict(pag_window=(0.5, 0.5)), ValueError, "pag_window"),
    (dict(scfg={"cap": 0}), ValueError, "cap"),
    (dict(scfg={"smoothing": "no"}), TypeError, "smoothing"),
    (dict(method="cfg", pag_layers="nomatch"), ValueError, "pag_layers"),
    (dict(callback=5), TypeError, "callback"),
    (dict(mask_steps=[-1]), ValueError, "mask_steps"),
    (dict(return_masks="no"), TypeError, "return_masks"),
    (dict(guidance_rescale=float("nan")), ValueError, "guidance_rescale"),
]


@pytest.mark.parametrize("kwargs,error,name", GUIDE_CASES, ids=[_id(c) for c in GUIDE_CASES])
def test_guide_refuses_bad_input_at_entry(pipe, kwargs, error, name):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "scfg+pag")

    def call():
        with guide(pipe, method, **kwargs):
            pipe("a red circle", num_inference_steps=1, guidance_scale=5.0, output_type="latent")

    _refused(pipe, call, error, name)


def test_at_least_forty_bad_inputs():
    assert len(GENERATE_CASES) + len(GUIDE_CASES) >= 40


def test_every_message_starts_with_the_parameter(pipe):
    """Messages of the shared checkers start with the parameter's name."""
    from attnguide import validation

    for call, name in [
        (lambda: validation.number("pag_scale", "x"), "pag_scale"),
        (lambda: validation.integer("seed", 1.5), "seed"),
        (lambda: validation.flag("smoothing", "no"), "smoothing"),
        (lambda: validation.window("cfg_window", "01"), "cfg_window"),
        (lambda: validation.seed_list(2**40, 1), "seed"),
    ]:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert str(info.value).startswith(name)


# ---------------------------------------------------------------------------------------------
# Accepted inputs


def test_numpy_and_torch_scalars_are_accepted(pipe):
    ref = generate(pipe, "a red circle", method="scfg+pag", guidance_scale=5.0, pag_scale=2.0, num_inference_steps=2,
                   seed=3, output_type="np", progress=False, scfg={"smoothing": True, "power": 4}).images
    out = generate(pipe, "a red circle", method="scfg+pag", guidance_scale=np.float32(5), pag_scale=torch.tensor(2.0),
                   num_inference_steps=np.int64(2), seed=np.int64(3), output_type="np", progress=False,
                   scfg={"smoothing": np.bool_(True), "power": np.int32(4)}, cfg_window=np.array([0.0, 1.0])).images
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_limits_can_be_raised_per_call(pipe):
    out = generate(pipe, "a red circle", method="cfg", guidance_scale=150.0, num_inference_steps=1, seed=0,
                   output_type="np", progress=False, limits={"max_scale": 200})
    assert np.isfinite(out.images).all()
    assert attnguide.validation.current_limits() == Limits()  # the override does not leak


def test_seed_range_is_the_generators_and_distinct(pipe):
    a = generate(pipe, "a red circle", num_inference_steps=1, seed=2**32 - 1, output_type="latent", progress=False).images
    b = generate(pipe, "a red circle", num_inference_steps=1, seed=0, output_type="latent", progress=False).images
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Non-finite values are errors naming the step and the cause, not black images


def test_overflowing_scale_raises_non_finite_error_naming_the_scale(pipe):
    with pytest.raises(NonFiniteError, match=r"step 1 of 2.*guidance_scale") as info:
        generate(pipe, "a red circle", method="scfg+pag", guidance_scale=1e300, num_inference_steps=2, seed=0,
                 output_type="np", progress=False, limits=Limits(max_scale=1e308))
    assert isinstance(info.value, FloatingPointError)


def test_nan_model_raises_non_finite_error_naming_the_unet():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline(**sd_components())
    with torch.no_grad():
        p.unet.conv_out.bias.fill_(math.nan)
    with pytest.raises(NonFiniteError, match="U-Net"):
        generate(p, "a red circle", method="cfg", num_inference_steps=2, seed=0, output_type="np", progress=False)


def test_nan_from_the_scheduler_step_is_reported(pipe):
    from diffusers import DDIMScheduler

    class Broken(DDIMScheduler):
        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            (out[0] if isinstance(out, tuple) else out.prev_sample).fill_(math.nan)
            return out

    sched = Broken.from_config(pipe.scheduler.config)
    with pytest.raises(NonFiniteError, match="scheduler"):
        generate(pipe, "a red circle", method="cfg", num_inference_steps=2, seed=0, output_type="np", progress=False,
                 scheduler=sched)
