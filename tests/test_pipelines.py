"""Settings every entry point shares: a model folder's attnguide.json over the library defaults."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from attnguide.guidance import DEFAULTS
from attnguide.pipelines import builtin_model_path, recommended_settings, resolve_settings

RECOMMENDS = {"method": "cfg+pag", "guidance_scale": 4.0, "pag_scale": 1.25, "num_inference_steps": 3,
              "pag_layers": ["up_blocks.1"], "scfg_levels": [2]}
LIBRARY = {**DEFAULTS, "pag_layers": ["mid"], "scfg_levels": None}


@pytest.fixture
def pipe_with_settings(sd_pipe, tmp_path):
    (tmp_path / "attnguide.json").write_text(json.dumps({**RECOMMENDS, "unknown_key": 1}))
    sd_pipe.register_to_config(_name_or_path=str(tmp_path))
    return sd_pipe


def test_library_defaults_without_a_folder(sd_pipe, tmp_path):
    assert recommended_settings(sd_pipe) == LIBRARY
    assert recommended_settings(tmp_path) == LIBRARY  # a folder without attnguide.json
    assert DEFAULTS == {"method": "scfg+pag", "guidance_scale": 7.5, "pag_scale": 3.0, "num_inference_steps": 50}


def test_folder_recommendation_wins_and_callers_win_over_it(pipe_with_settings, tmp_path):
    assert recommended_settings(pipe_with_settings) == RECOMMENDS  # unknown keys are ignored
    assert recommended_settings(str(tmp_path)) == RECOMMENDS
    assert resolve_settings(tmp_path, pag_scale=2.0, method=None)["pag_scale"] == 2.0
    assert resolve_settings(tmp_path, pag_scale=2.0, method=None)["method"] == "cfg+pag"


def test_builtin_model_recommendation_is_read_for_none():
    shipped = json.loads((builtin_model_path() / "attnguide.json").read_text())
    settings = recommended_settings(None)
    assert all(settings[k] == v for k, v in shipped.items())


def test_generate_and_guide_take_the_recommendation(pipe_with_settings):
    from attnguide import generate, guide

    result = generate(pipe_with_settings, "a red circle", seed=0, output_type="latent", progress=False)
    # cfg+pag: three branches on each of the recommended 3 steps.
    assert result.branches_per_step == [("uncond", "cond", "perturbed")] * 3
    explicit = generate(pipe_with_settings, "a red circle", seed=0, output_type="latent", progress=False,
                        method="cfg+pag", guidance_scale=4.0, pag_scale=1.25, num_inference_steps=3, pag_layers="up_blocks.1")
    assert (result.images == explicit.images).all()
    # The recommended PAG layers are used, not the library's mid block.
    mid = generate(pipe_with_settings, "a red circle", seed=0, output_type="latent", progress=False, pag_layers="mid")
    assert not (result.images == mid.images).all()
    with guide(pipe_with_settings) as run:
        guided = pipe_with_settings("a red circle", num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                                    generator=torch.Generator().manual_seed(0)).images
    assert run.branches_per_step == [("uncond", "cond", "perturbed")] * 2
    with guide(pipe_with_settings, pag_layers="up_blocks.1"):
        named = pipe_with_settings("a red circle", num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                                   generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(guided, named)


def test_eval_and_ui_take_the_recommended_pag_layers(pipe_with_settings, tmp_path):
    from attnguide.evaluation.settings import EvalSettings
    from attnguide.evaluation.sweep import Config
    from attnguide.ui.compare import model_info

    model = tmp_path / "model"
    pipe_with_settings.save_pretrained(model, safe_serialization=True)
    (model / "attnguide.json").write_text(json.dumps(RECOMMENDS))
    settings = EvalSettings(out=tmp_path / "out", configs=[Config("pag", pag_scale=2.0)], model=str(model))
    assert settings.pag_layers == ("up_blocks.1",) and settings.steps == 3
    given = EvalSettings(out=tmp_path / "out", configs=[Config("pag", pag_scale=2.0)], model=str(model), pag_layers=("mid",))
    assert given.pag_layers == ("mid",)
    assert model_info(pipe_with_settings).default_layers == ("up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                                                              "up_blocks.1.attentions.1.transformer_blocks.0.attn1")


def test_cli_generate_takes_the_recommendation(pipe_with_settings, tmp_path):
    from attnguide.cli import main

    model = tmp_path / "model"
    pipe_with_settings.save_pretrained(model, safe_serialization=True)
    (model / "attnguide.json").write_text(json.dumps(RECOMMENDS))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "--model", str(model), "--prompt", "a red circle", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.glob("*.png")] == ["a-red-circle_cfg-pag_seed0.png"]
