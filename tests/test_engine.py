"""attnguide.engine.guide on the user's own diffusers pipelines, every workflow, tiny random models.

Equality with diffusers' own PAG pipeline classes (same components, scheduler, seed, layers "mid"),
CFG through the engine = the plain pipeline, the no-op settings (PAG at s = 0, S-CFG with its rate
forced to 1) on workflows diffusers has no PAG class for, S-CFG masks everywhere, step windows,
restoration after an exception, and clear errors before any denoising.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import (
    IP_EMBED_DIM,
    load_tiny_ip_adapter,
    pipeline_from,
    sd_components,
    sdxl_components,
    tiny_controlnet,
    tiny_inpaint_unet,
    tiny_motion_adapter,
    tiny_t2i_adapter,
    tiny_unet,
)
from PIL import Image

from attnguide.engine import guide

STEPS = 4
PROMPT = "a red circle on a gray background"
SIZE = 32  # pixels: tiny_vae halves, so the latent is tiny_unet's 16x16
PAG_SCALE = 2.0


# --- inputs ---------------------------------------------------------------------------------------


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 6:20] = 255
    return Image.fromarray(mask)


def _ip_embeds(cfg: bool) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` as the pipelines take them: [negative, positive] stacked under CFG."""
    g = torch.Generator().manual_seed(7)
    positive = torch.randn(1, 1, IP_EMBED_DIM, generator=g)
    return [torch.cat([torch.zeros_like(positive), positive]) if cfg else positive]


# --- workflows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workflow:
    name: str
    plain: str  # diffusers class name of the user's pipeline
    peer: str | None  # diffusers' PAG class for the same workflow, if there is one
    build: Callable[[], dict]  # components
    inputs: Callable[[bool], dict] = lambda cfg: {}  # call arguments besides prompt/steps/seed/w
    steps: int = STEPS  # denoising steps (U-Net calls) a call makes
    video: bool = False


def _sd(unet=None, **more) -> dict:
    components = sd_components()
    if unet is not None:
        components["unet"] = unet
    components.update(more)
    return components


def _sd_controlnet(multi: bool = False) -> dict:
    unet = tiny_unet().eval()
    controlnet = [tiny_controlnet(unet, seed=1), tiny_controlnet(unet, seed=5)] if multi else tiny_controlnet(unet)
    return _sd(unet, controlnet=controlnet)


def _sdxl(unet=None, **more) -> dict:
    components = sdxl_components(unet)
    components.update(more)
    return components


def _sdxl_controlnet() -> dict:
    unet = tiny_unet(sdxl=True).eval()
    return _sdxl(unet, controlnet=tiny_controlnet(unet))


def _sd_ip_adapter() -> dict:
    unet = tiny_unet().eval()
    load_tiny_ip_adapter(unet)
    return _sd(unet)


def _animatediff() -> dict:
    from diffusers import UNetMotionModel

    components = sd_components()
    components["unet"] = UNetMotionModel.from_unet2d(components["unet"], tiny_motion_adapter()).eval()
    components["motion_adapter"] = None
    return components


IMG2IMG = lambda cfg: {"image": _picture(1), "strength": 0.75}  # noqa: E731
INPAINT = lambda cfg: {"image": _picture(1), "mask_image": _mask(), "strength": 0.75}  # noqa: E731
CONTROL = lambda cfg: {"image": _picture(2)}  # noqa: E731
MULTI_CONTROL = lambda cfg: {"image": [_picture(2), _picture(3)], "controlnet_conditioning_scale": [0.8, 0.6]}  # noqa: E731
CONTROL_INPAINT = lambda cfg: {"image": _picture(1), "mask_image": _mask(), "control_image": _picture(2), "strength": 0.75}  # noqa: E731
CONTROL_IMG2IMG = lambda cfg: {"image": _picture(1), "control_image": _picture(2), "strength": 0.75}  # noqa: E731

WITH_PEER = [
    Workflow("sd-img2img", "StableDiffusionImg2ImgPipeline", "StableDiffusionPAGImg2ImgPipeline", _sd, IMG2IMG, steps=3),
    Workflow("sd-inpaint-4ch", "StableDiffusionInpaintPipeline", "StableDiffusionPAGInpaintPipeline", _sd, INPAINT, steps=3),
    Workflow("sd-inpaint-9ch", "StableDiffusionInpaintPipeline", "StableDiffusionPAGInpaintPipeline",
             lambda: _sd(tiny_inpaint_unet()), INPAINT, steps=3),
    Workflow("sd-controlnet", "StableDiffusionControlNetPipeline", "StableDiffusionControlNetPAGPipeline",
             _sd_controlnet, CONTROL),
    Workflow("sd-multi-controlnet", "StableDiffusionControlNetPipeline", "StableDiffusionControlNetPAGPipeline",
             lambda: _sd_controlnet(multi=True), MULTI_CONTROL),
    Workflow("sd-controlnet-inpaint", "StableDiffusionControlNetInpaintPipeline", "StableDiffusionControlNetPAGInpaintPipeline",
             _sd_controlnet, lambda cfg: {"image": _picture(1), "mask_image": _mask(), "control_image": _picture(2)}),
    Workflow("sdxl-img2img", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPAGImg2ImgPipeline", _sdxl, IMG2IMG, steps=3),
    Workflow("sdxl-inpaint", "StableDiffusionXLInpaintPipeline", "StableDiffusionXLPAGInpaintPipeline", _sdxl, INPAINT, steps=3),
    Workflow("sdxl-controlnet", "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetPAGPipeline",
             _sdxl_controlnet, CONTROL),
    Workflow("sdxl-controlnet-img2img", "StableDiffusionXLControlNetImg2ImgPipeline",
             "StableDiffusionXLControlNetPAGImg2ImgPipeline", _sdxl_controlnet, CONTROL_IMG2IMG, steps=3),
    Workflow("animatediff", "AnimateDiffPipeline", "AnimateDiffPAGPipeline", _animatediff,
             lambda cfg: {"num_frames": 2}, video=True),
    Workflow("sd-ip-adapter", "StableDiffusionPipeline", "StableDiffusionPAGPipeline", _sd_ip_adapter,
             lambda cfg: {"ip_adapter_image_embeds": _ip_embeds(cfg)}),
]

WITHOUT_PEER = [
    Workflow("sdxl-controlnet-inpaint", "StableDiffusionXLControlNetInpaintPipeline", None, _sdxl_controlnet, CONTROL_INPAINT, steps=3),
    Workflow("sd-controlnet-img2img", "StableDiffusionControlNetImg2ImgPipeline", None, _sd_controlnet, CONTROL_IMG2IMG, steps=3),
    Workflow("sd-controlnet-guess-mode", "StableDiffusionControlNetPipeline", None, _sd_controlnet,
             lambda cfg: {"image": _picture(2), "guess_mode": True}),
    Workflow("sd-t2i-adapter", "StableDiffusionAdapterPipeline", None, lambda: _sd(adapter=tiny_t2i_adapter()),
             lambda cfg: {"image": _picture(2)}),
]

ALL = WITH_PEER + WITHOUT_PEER
BY_NAME = {w.name: w for w in ALL}


@functools.lru_cache(maxsize=None)
def _components(name: str) -> dict:
    return BY_NAME[name].build()




def plain(workflow: Workflow):
    return pipeline_from(workflow.plain, _components(workflow.name))


def peer(workflow: Workflow):
    return pipeline_from(workflow.peer, _components(workflow.name), pag_applied_layers=["mid"])


def call(pipe, workflow: Workflow, w: float, seed: int = 0, prompt: str = PROMPT, **kw) -> np.ndarray:
    args = dict(workflow.inputs(w > 1.0), prompt=prompt, num_inference_steps=STEPS, guidance_scale=w,
                generator=torch.Generator().manual_seed(seed), output_type="np")
    args.update(kw)
    out = pipe(**args)
    return np.asarray(out.frames if workflow.video else out.images)


class RowCounter:
    """Rows of every U-Net evaluation, from a pre-hook on the U-Net's first convolution."""

    def __init__(self, unet) -> None:
        self.rows: list[int] = []
        self.handle = unet.conv_in.register_forward_pre_hook(lambda module, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def ids(workflows):
    return [w.name for w in workflows]


# --- 1. equality with diffusers' PAG pipelines --------------------------------------------------------


@pytest.mark.parametrize("method,w", [("pag", 1.0), ("cfg+pag", 5.0)])
@pytest.mark.parametrize("workflow", WITH_PEER, ids=ids(WITH_PEER))
def test_equals_diffusers_pagpipeline_from(workflow, method, w):
    pipe = plain(workflow)
    gaps = []  # |ε_c − ε_p|: the perturbation really acts (PAG is not a no-op here)
    with guide(pipe, method, pag_scale=PAG_SCALE, pag_layers="mid",
               callback=lambda s: gaps.append((s.predictions["cond"] - s.predictions["perturbed"]).abs().max())) as run:
        ours = call(pipe, workflow, w, seed=3)
    reference = call(peer(workflow), workflow, w, seed=3, pag_scale=PAG_SCALE)
    assert run.unet_evaluations == workflow.steps * (3 if w > 1 else 2)
    assert len(gaps) == workflow.steps and min(gaps) > 1e-4
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


# --- 2. CFG through the engine is the pipeline itself -----------------------------------------------------


@pytest.mark.parametrize("workflow", ALL, ids=ids(ALL))
def test_cfg_equals_the_plainpipeline_from(workflow):
    pipe = plain(workflow)
    reference = call(pipe, workflow, 5.0, seed=4)
    with guide(pipe, "cfg") as run:
        ours = call(pipe, workflow, 5.0, seed=4)
    assert run.branches_per_step == [("uncond", "cond")] * workflow.steps
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


# --- 3. workflows without a diffusers PAG class: the no-op settings are the plain pipeline ------------------


@pytest.mark.parametrize("workflow", WITHOUT_PEER, ids=ids(WITHOUT_PEER))
def test_noop_guidance_equals_the_plainpipeline_from(workflow):
    pipe = plain(workflow)
    reference = call(pipe, workflow, 5.0, seed=5)
    with guide(pipe, "cfg+pag", pag_scale=0.0):
        pag_zero = call(pipe, workflow, 5.0, seed=5)
    rates = []
    with guide(pipe, "scfg", scfg={"rate_min": 1.0, "rate_max": 1.0}, callback=lambda s: rates.append(s.rate)):
        scfg_one = call(pipe, workflow, 5.0, seed=5)
    np.testing.assert_allclose(pag_zero, reference, atol=1e-5, rtol=0)
    np.testing.assert_allclose(scfg_one, reference, atol=1e-5, rtol=0)
    assert len(rates) == workflow.steps and all(torch.allclose(r, torch.ones_like(r)) for r in rates)


@pytest.mark.parametrize("workflow", WITHOUT_PEER, ids=ids(WITHOUT_PEER))
def test_pag_changes_the_image_without_a_peer(workflow):
    pipe = plain(workflow)
    with guide(pipe, "cfg") as run_cfg:
        cfg = call(pipe, workflow, 5.0, seed=6)
    with guide(pipe, "cfg+pag", pag_scale=PAG_SCALE) as run:
        pag = call(pipe, workflow, 5.0, seed=6)
    assert np.isfinite(pag).all() and np.abs(pag - cfg).max() > 1e-4
    assert run.branches_per_step == [("uncond", "cond", "perturbed")] * workflow.steps
    assert run_cfg.unet_evaluations == 2 * workflow.steps and run.unet_evaluations == 3 * workflow.steps


# --- 4. S-CFG masks on every workflow ----------------------------------------------------------------------


@pytest.mark.parametrize("workflow", ALL, ids=ids(ALL))
def test_scfg_returns_masks(workflow):
    pipe = plain(workflow)
    with RowCounter(pipe.unet) as counter, guide(pipe, "scfg", return_masks=True) as run:
        image = call(pipe, workflow, 5.0, seed=8)
    assert np.isfinite(image).all()
    assert len(counter.rows) == workflow.steps
    assert run.masks is not None and sorted(run.masks.steps) == list(range(workflow.steps))
    per_image = 2 if workflow.video else 1  # a video's masks are per frame
    for labels, foreground in run.masks.steps.values():
        assert labels.shape[0] == per_image and foreground.shape == labels.shape
        assert foreground.dtype == torch.bool
    assert len(run.masks.tokens) == per_image and run.masks.tokens[0][:2] == ["<start>", "a"]


# --- the tiny workflows are not degenerate: each conditioning input changes the image ------------------------


@pytest.mark.parametrize("name,key,other", [
    ("sd-controlnet", "image", lambda: _picture(5)),
    ("sdxl-controlnet", "image", lambda: _picture(5)),
    ("sd-t2i-adapter", "image", lambda: _picture(5)),
    ("sd-inpaint-9ch", "image", lambda: _picture(6)),
    ("sd-ip-adapter", "ip_adapter_image_embeds", lambda: [3 * e for e in _ip_embeds(True)]),
])
def test_conditioning_changes_the_image(name, key, other):
    workflow = BY_NAME[name]
    pipe = plain(workflow)
    with guide(pipe, "cfg+pag", pag_scale=PAG_SCALE):
        a = call(pipe, workflow, 5.0, seed=12)
        b = call(pipe, workflow, 5.0, seed=12, **{key: other()})
    assert np.abs(a - b).max() > 1e-3


# --- 5. the paper's ControlNet case: PAG alone with an empty prompt -----------------------------------------


def test_empty_prompt_pag_on_controlnet_equals_diffusers():
    workflow = BY_NAME["sd-controlnet"]
    pipe = plain(workflow)
    with guide(pipe, "pag", pag_scale=PAG_SCALE) as run:
        ours = call(pipe, workflow, 1.0, seed=9, prompt="")
    reference = call(peer(workflow), workflow, 1.0, seed=9, prompt="", pag_scale=PAG_SCALE)
    assert run.branches_per_step == [("cond", "perturbed")] * STEPS
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    plain_image = call(pipe, workflow, 1.0, seed=9, prompt="")
    assert np.abs(ours - plain_image).max() > 1e-4  # PAG did something


# --- 6. step windows -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd-controlnet", "sdxl-img2img"])
def test_windows_follow_the_plan(name):
    workflow = BY_NAME[name]
    pipe = plain(workflow)
    images = 2
    with RowCounter(pipe.unet) as counter, guide(pipe, "cfg+pag", pag_scale=PAG_SCALE, cfg_window=(0, 0.5),
                                                 pag_window=(0.5, 1.0)) as run:
        out = call(pipe, workflow, 5.0, seed=10, num_images_per_prompt=images)
    steps = workflow.steps
    plan = [("uncond", "cond") if s / steps < 0.5 else ("cond", "perturbed") for s in range(steps)]
    assert run.branches_per_step == plan
    assert counter.rows == [len(p) * images for p in plan]
    assert run.unet_evaluations == sum(len(p) for p in plan)
    assert np.isfinite(out).all()


# --- 7. everything restored after an exception ------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _raise_in_guide_callback(info):
    if info.step == 1:
        raise Boom("stop")


def _raise_in_pipeline_callback(pipe, step, timestep, tensors):
    if step == 1:
        raise Boom("stop")
    return tensors


@pytest.mark.parametrize("ip_adapter,method,where", [
    (False, "scfg+pag", "guide"), (False, "cfg+pag", "pipeline"),
    (True, "scfg+pag", "guide"), (True, "cfg+pag", "pipeline"),
], ids=["plain-unet-guide-callback", "plain-unet-pipeline-callback", "ip-adapter-guide-callback",
        "ip-adapter-pipeline-callback"])
def test_restored_after_an_exception(ip_adapter, method, where):
    workflow = BY_NAME["sd-ip-adapter" if ip_adapter else "sd-controlnet"]
    components = workflow.build()  # fresh: this test must not leak into the cached components
    pipe = pipeline_from(workflow.plain, components)
    unet = pipe.unet
    before = call(pipe, workflow, 5.0, seed=11)
    processors = dict(unet.attn_processors)
    keys = set(unet.state_dict())
    if ip_adapter:  # IP-Adapter's processors are nn.Modules registered under the attention layers
        assert any(isinstance(p, torch.nn.Module) for p in processors.values())
    guide_callback = _raise_in_guide_callback if where == "guide" else None
    pipeline_callback = _raise_in_pipeline_callback if where == "pipeline" else None
    with RowCounter(unet) as counter, pytest.raises(Boom):
        with guide(pipe, method, callback=guide_callback, return_masks=True):
            call(pipe, workflow, 5.0, seed=11, callback_on_step_end=pipeline_callback)
    assert len(counter.rows) == 2  # it raised in step 1, mid-denoising
    assert "forward" not in vars(unet)
    assert "progress_bar" not in vars(pipe)
    assert "encode_prompt" not in vars(pipe)
    after = unet.attn_processors
    assert after.keys() == processors.keys()
    assert all(after[k] is processors[k] for k in processors)
    assert set(unet.state_dict()) == keys
    np.testing.assert_array_equal(call(pipe, workflow, 5.0, seed=11), before)


# --- 8. bad input: a clear error before any denoising --------------------------------------------------------


def _assert_unpatched(pipe) -> None:
    assert "forward" not in vars(pipe.unet)
    assert "progress_bar" not in vars(pipe)
    assert "encode_prompt" not in vars(pipe)
    assert not any(type(p).__name__ == "GuidanceAttnProcessor" for p in pipe.unet.attn_processors.values())


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "nope"}, "method"),
    ({"method": "cfg+pag", "pag_layers": "nothing_here"}, "pag_layers"),
    ({"method": "cfg+pag", "pag_layers": "mid.attentions.0.transformer_blocks.0.attn2"}, "pag_layers"),
    ({"method": "pag", "pag_layers": []}, "pag_layers"),
])
def test_bad_configuration_raises_on_entry(kwargs, match):
    pipe = plain(BY_NAME["sd-controlnet"])
    with pytest.raises(ValueError, match=match):
        with guide(pipe, **kwargs):
            pytest.fail("the block must not run")
    _assert_unpatched(pipe)


def test_a_diffusers_pag_pipeline_is_refused():
    workflow = BY_NAME["sd-controlnet"]
    pag_pipe = peer(workflow)
    with pytest.raises(ValueError, match="pipe .*PAG pipeline"):
        with guide(pag_pipe, "cfg+pag"):
            pytest.fail("the block must not run")
    _assert_unpatched(pag_pipe)


@pytest.mark.parametrize("name", ["sd-controlnet", "sdxl-img2img", "animatediff"])
@pytest.mark.parametrize("method,w", [("cfg", 1.0), ("scfg+pag", 1.0), ("pag", 5.0), ("none", 5.0)])
def test_guidance_scale_mismatch_raises_before_the_unet_runs(name, method, w):
    workflow = BY_NAME[name]
    pipe = plain(workflow)
    with RowCounter(pipe.unet) as counter:
        with pytest.raises(ValueError, match="guidance_scale"):
            with guide(pipe, method):
                call(pipe, workflow, w)
    assert counter.rows == []
    _assert_unpatched(pipe)
