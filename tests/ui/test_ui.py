"""The web UI's functions without a browser: form checks, bounds, results equal to ``generate``,
the page's handlers, and the command line without gradio."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from click.testing import CliRunner

from attnguide.cli import main
from attnguide.ui.form import Bounds, parse_request

LAYERS = ("mid_block.attentions.0.transformer_blocks.0.attn1", "down_blocks.1.attentions.0.transformer_blocks.0.attn1")


def form(**changes) -> dict:
    values = dict(prompt="a red circle", negative_prompt="", seeds="0", steps=4, height=32, width=32, methods=["cfg", "scfg"],
                  guidance_scale=5.0, pag_scale=2.0, pag_layers=[LAYERS[0]], scfg_mode="reference", scfg_levels=[],
                  cfg_window=(0.0, 1.0), pag_window=(0.0, 1.0), allowed_layers=LAYERS, allowed_levels=(1, 2))
    values.update(changes)
    return values


def test_form_gives_a_request():
    request = parse_request(Bounds(), **form(seeds="3, 5", negative_prompt="  ", steps=4.0, scfg_levels=[2, 1]))
    assert request.seeds == (3, 5) and request.negative_prompt is None and request.steps == 4
    assert request.scfg_levels == (1, 2) and request.images == 4
    kwargs = request.generate_kwargs("scfg")
    assert kwargs["seed"] == [3, 5] and kwargs["num_images_per_prompt"] == 2 and kwargs["return_masks"]
    assert not request.generate_kwargs("cfg")["return_masks"]  # masks only where S-CFG makes them


@pytest.mark.parametrize("changes, message", [
    (dict(prompt="   "), "prompt is empty"),
    (dict(methods=[]), "choose at least one method"),
    (dict(methods=["cfg", "magic"]), "unknown method"),
    (dict(seeds=""), "at least one seed"),
    (dict(seeds="1, x"), "'x' is not a whole number"),
    (dict(seeds="-1"), "is not a whole number"),
    (dict(steps=None), "steps must be a whole number"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(guidance_scale=1.0), "must be > 1 for method 'cfg'"),
    (dict(guidance_scale=float("nan")), "w (guidance scale) must be a number"),
    (dict(methods=["pag"], pag_layers=[]), "at least one PAG layer"),
    (dict(methods=["pag"], pag_layers=["../etc/passwd"]), "not self-attention layers"),
    (dict(scfg_mode="magic"), "S-CFG mode"),
    (dict(scfg_levels=[8]), "S-CFG levels"),
    (dict(cfg_window=(0.6, 0.4)), "cfg_window"),
])
def test_form_refuses_bad_input(changes, message):
    with pytest.raises(ValueError, match=None) as error:
        parse_request(Bounds(), **form(**changes))
    assert message in str(error.value)


def test_none_and_pag_ignore_w():
    assert parse_request(Bounds(), **form(methods=["none", "pag"], guidance_scale=0.0)).guidance_scale == 0.0


def test_bounds():
    bounds = Bounds(max_steps=10, max_size=64, max_images=4, max_methods=2)
    for changes, message in [(dict(steps=11), "steps must be between 1 and 10"), (dict(width=128), "width must be between 1 and 64"),
                             (dict(methods=["cfg", "scfg", "pag"]), "at most 2 per request"),
                             (dict(seeds="0 1 2"), "3 seeds x 2 methods = 6 images, at most 4"),
                             (dict(seeds="0 1 2 3 4"), "5 given, at most 4")]:
        with pytest.raises(ValueError) as error:
            parse_request(bounds, **form(**changes))
        assert message in str(error.value)
    parse_request(bounds, **form(steps=10, width=64, seeds="0 1"))
    with pytest.raises(ValueError, match="max_steps"):
        Bounds(max_steps=0)


def test_comparison_equals_generate_pixel_for_pixel(sd_pipe):
    from attnguide import generate
    from attnguide.ui.compare import model_info, run_comparison

    info = model_info(sd_pipe)
    assert info.size == 32 and LAYERS[0] in info.self_layers and info.default_layers == (LAYERS[0],)
    assert all("attn2" not in name for name in info.self_layers)
    request = parse_request(Bounds(), **form(seeds="0, 7", steps=3, methods=["cfg", "scfg+pag"], scfg_levels=[2],
                                             allowed_layers=info.self_layers, allowed_levels=info.levels))
    seen = []
    result = run_comparison(sd_pipe, request, lambda done, total, text: seen.append((done, total, text)))
    assert seen[0] == (1, 6, "cfg: step 1/3") and seen[-1] == (6, 6, "scfg+pag: step 3/3")
    for item in result.results:
        direct = generate(sd_pipe, "a red circle", method=item.method, guidance_scale=5.0, pag_scale=2.0, pag_layers=[LAYERS[0]],
                          num_inference_steps=3, height=32, width=32, seed=[0, 7], num_images_per_prompt=2,
                          scfg={"mode": "reference", "levels": (2,)}, progress=False)
        for mine, theirs in zip(item.images, direct.images, strict=True):
            assert np.array_equal(np.asarray(mine), np.asarray(theirs))
        assert item.unet_evaluations == direct.unet_evaluations and item.seconds > 0
    assert result.mask_sources() == ["scfg+pag · seed 0", "scfg+pag · seed 7"]
    assert result.mask_steps() == [0, 1, 2]
    first, last = result.overlay("scfg+pag · seed 7", 0), result.overlay("scfg+pag · seed 7")
    assert first.size[0] == 256 and last.size[0] == 256
    assert [caption for _, caption in result.gallery()] == ["cfg · seed 0", "scfg+pag · seed 0", "cfg · seed 7", "scfg+pag · seed 7"]
    assert "| scfg+pag |" in result.summary() and "U-Net evaluations" in result.summary()


def test_transformer_model_lists_its_layers_and_compares():
    from conftest import pipeline_from

    from attnguide import generate
    from attnguide.evaluation.tiny_transformers import FAMILIES
    from attnguide.ui.compare import model_info, run_comparison

    pipe = pipeline_from("StableDiffusion3Pipeline", FAMILIES["sd3"].build())
    info = model_info(pipe)
    assert info.self_layers == ("transformer_blocks.0.attn", "transformer_blocks.1.attn", "transformer_blocks.2.attn")
    assert info.default_layers == ("transformer_blocks.1.attn",) and info.levels == () and info.size == 16
    request = parse_request(Bounds(), **form(seeds="3", steps=2, width=16, height=16, methods=["scfg+pag"],
                                             pag_layers=list(info.default_layers), allowed_layers=info.self_layers,
                                             allowed_levels=info.levels))
    (item,) = run_comparison(pipe, request, lambda *args: None).results
    direct = generate(pipe, "a red circle", method="scfg+pag", guidance_scale=5.0, pag_scale=2.0, pag_layers=list(info.default_layers),
                      num_inference_steps=2, height=16, width=16, seed=[3], progress=False)
    assert np.array_equal(np.asarray(item.images[0]), np.asarray(direct.images[0])) and item.masks.steps


def test_page_handler_reports_errors_without_traceback(sd_pipe, caplog):
    pytest.importorskip("gradio")
    from attnguide.ui.app import launch_kwargs, make_app

    demo = make_app(pipe=sd_pipe, bounds=dict(max_steps=8))
    assert demo._queue.default_concurrency_limit == 1
    assert "share" not in launch_kwargs(demo) and launch_kwargs(demo).get("ssr_mode", False) is False
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns  # a list before gradio 5
    handler = next(f.fn for f in fns if f.fn is not None and f.fn.__name__ == "generate")

    def call(**changes):
        values = dict(prompt_="a red circle", negative_="", seeds_="0", steps_=2, width_=32, height_=32, methods_=["cfg", "scfg"],
                      w_=5.0, s_=2.0, layers_=[LAYERS[0]], mode_="reference", levels_=[], cfg_start_=0.0, cfg_stop_=1.0,
                      pag_start_=0.0, pag_stop_=1.0)
        values.update(changes)
        return handler(*values.values(), progress=lambda *args, **kwargs: None)

    assert call(width_=30)[0].startswith("Error: width must be a positive multiple of")
    assert call(steps_=9)[0] == "Error: steps must be between 1 and 8, got 9"
    out = call()
    assert out[0].startswith("Done") and out[1].mask_sources() == ["scfg · seed 0"] and out[6] is not None


def test_cli_without_gradio(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed
    runner = CliRunner()
    result = runner.invoke(main, ["ui"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: attnguide ui needs gradio, which is not installed: pip install 'attnguide[ui]'"
    listing = runner.invoke(main, ["--help"])
    assert listing.exit_code == 0 and "ui" in listing.output.split() and "compare guidance methods" in listing.output
    options = runner.invoke(main, ["ui", "--help"])
    assert options.exit_code == 0 and "127.0.0.1" in options.output and "--max-images" in options.output
    assert runner.invoke(main, ["generate", "--help"]).exit_code == 0
