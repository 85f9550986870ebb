"""A ``torch.compile``d U-Net (``pipe.unet = torch.compile(pipe.unet)``) under ``guide``: the same layer
names as the uncompiled one, the same images, and no recompilation after the first call of each method.

Backend ``eager`` (dynamo's tracing and guards, no code generation): recompiles are decided by dynamo's
guards, which are the same for every backend; inductor would take minutes on a CPU.
"""
from __future__ import annotations

import torch
from conftest import sd_components

from attnguide import attention
from attnguide.engine import guide
from attnguide.guidance import METHODS, REGISTRY

STEPS = 2


def _run(pipe, method: str) -> torch.Tensor:
    w = 1.0 if method in ("none", "pag") else 7.5
    with guide(pipe, method, pag_layers=("mid", "up.1.attentions.0"), pag_scale=2.0) as run:
        image = pipe("a red circle", num_inference_steps=STEPS, guidance_scale=w, height=32, width=32,
                     output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert run.unet_evaluations == STEPS * len(REGISTRY[method].branches)
    return image


def test_compiled_unet_same_layers_same_images_no_recompiles():
    from diffusers import StableDiffusionPipeline
    from torch._dynamo.utils import counters

    pipe = StableDiffusionPipeline(**sd_components())
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    reference = {m: _run(pipe, m) for m in METHODS}
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="eager")
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert attention.list_layers(compiled) == attention.list_layers(unet)
    assert attention.select_self_attention(compiled, "mid") == attention.select_self_attention(unet, "mid")
    assert attention.scfg_layers(compiled, (1, 2)) == attention.scfg_layers(unet, (1, 2))
    pipe.unet = compiled
    graphs = {}
    try:
        for method in METHODS:  # first call of each method: it may compile
            torch.testing.assert_close(_run(pipe, method), reference[method], rtol=0, atol=1e-5)
            graphs[method] = counters["stats"]["unique_graphs"]
        first = counters["stats"]["unique_graphs"]
        for method in METHODS + METHODS[::-1]:  # again, in a new guide block each, switching methods
            torch.testing.assert_close(_run(pipe, method), reference[method], rtol=0, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == first, "a method recompiled after its first call"
        assert not sum(counters["recompiles"].values()) if "recompiles" in counters else True
        assert first <= len(METHODS), graphs  # one graph per method at most (no graph breaks in the taps)
    finally:
        pipe.unet = unet
        torch._dynamo.reset()
    assert all(type(m.processor).__name__ != "GuidanceAttnProcessor" for m in attention.attention_modules(unet).values())
