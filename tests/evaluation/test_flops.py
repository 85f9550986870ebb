"""Deterministic cost accounting (``attnguide bench --count-only``): the cost model counts what the engine
runs, PAG's identity rows cost a value projection only, and no method pushes the U-Net's attention off
the fused ``scaled_dot_product_attention`` kernel. Tiny model: the meta device and one CPU step."""
from __future__ import annotations

import functools

import pytest
from click.testing import CliRunner
from conftest import sd_components

from attnguide import attention
from attnguide.engine import guide
from attnguide.evaluation import bench
from attnguide.guidance import METHODS, REGISTRY
from attnguide.pipeline_call import instance_patch

LATENT, TOKENS = (16, 16), 24  # conftest's tiny U-Net: 32-pixel images, the built-in tokenizer's 24 tokens


@pytest.fixture(scope="module")
def meta_unet():
    unet, _, tokens, _ = bench.counting_unet("tiny", "meta")
    assert tokens == TOKENS
    return unet


def test_flops_ratios_and_identity_rows_cost_a_value_projection(meta_unet):
    flops = {}
    for m in METHODS:
        c = bench.count_step(meta_unet, m, LATENT, TOKENS)
        assert c.branches == REGISTRY[m].branches
        flops[m] = c.flops["unet"] + c.flops["identity"]
    assert flops["cfg"] == 2 * flops["none"]
    assert flops["scfg"] == flops["cfg"]  # S-CFG's own cost is all outside the U-Net's (counted apart)
    # PAG's perturbed rows skip exactly q/k projections and the attention of the perturbed layers.
    saved = 0
    for name in attention.select_self_attention(meta_unet, "mid"):
        layer = dict(meta_unet.named_modules())[name]
        c = layer.to_q.in_features
        n = (LATENT[0] // 4) * (LATENT[1] // 4)  # the mid block's grid: latent / 4
        saved += 2 * (2 * n * c * c) + 2 * (2 * n * n * c)  # to_q + to_k, QK^T + PV
    assert flops["pag"] == 2 * flops["none"] - saved
    assert flops["pag"] <= flops["cfg"] and flops["cfg+pag"] <= 1.5 * flops["cfg"]
    assert flops["scfg+pag"] == flops["cfg+pag"]


def test_cost_model_counts_what_the_engine_runs():
    """count_step's U-Net, identity and recording FLOPs and kernels = those of a real guided pipeline step (CPU)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd_components())
    pipe.set_progress_bar_config(disable=True)
    layers = len(attention.list_layers(pipe.unet))
    for method in ("cfg", "pag", "scfg+pag"):
        counter = bench.CostCounter()
        forward = pipe.unet.forward

        @functools.wraps(forward)  # the engine binds the U-Net's arguments by forward's signature
        def counted(*args, **kwargs):
            with counter.phase("unet"):
                return forward(*args, **kwargs)

        w = 1.0 if method == "pag" else 7.5
        with counter.active(), instance_patch(pipe.unet, "forward", counted), guide(pipe, method, pag_scale=2.0):
            pipe("a red circle", num_inference_steps=1, guidance_scale=w, height=32, width=32, output_type="pt")
        model = bench.count_step(pipe.unet, method, LATENT, TOKENS)
        for phase in ("unet", "identity", "record"):
            assert counter.flops[phase] == model.flops[phase], (method, phase)
            assert counter.op_summary([phase]) == model.op_summary([phase]), (method, phase)
        unet = counter.op_summary(["unet"])
        # Every attention layer: one fused SDPA call for its normal rows, no math path, no explicit softmax.
        assert unet == {**unet, "sdpa_calls": layers, "sdpa_fused_kernels": layers, "math_softmax": 0, "explicit_softmax": 0}
        identity = counter.op_summary(["identity"])
        perturbed = len(attention.select_self_attention(pipe.unet, "mid")) if REGISTRY[method].pag else 0
        assert identity["sdpa_calls"] == 0 and identity["matmuls"] == 2 * perturbed  # to_v and to_out only
        record = counter.op_summary(["record"])
        assert record["sdpa_calls"] == 0 and record["math_softmax"] == 0
        assert record["explicit_softmax"] == (len(attention.scfg_layers(pipe.unet, attention.default_scfg_levels(pipe.unet)))
                                              if REGISTRY[method].uses_scfg else 0)  # the cross maps (T tokens): small


def test_count_only_cli(tmp_path):
    from attnguide.cli import main

    path = tmp_path / "counts.json"
    result = CliRunner().invoke(main, ["bench", "--count-only", "--count-models", "tiny", "--json", str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "| pag | 2 | 100 | 1.0000 |" in result.output and "#### tiny 32x32" in result.output
    import json

    costs = json.loads(path.read_text())["models"]["tiny"]["methods"]
    assert costs["cfg"]["unet_flops_x_cfg"] == 1.0 and costs["pag"]["unet_flops_x_cfg"] <= 1.0
    assert costs["cfg+pag"]["unet_flops_x_cfg"] <= 1.5 and costs["scfg"]["extra_flops_per_image"]["segment"] > 0
