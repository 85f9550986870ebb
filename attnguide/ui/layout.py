"""The gradio page: the form, the results grid, and the S-CFG mask viewer with its step slider.

Handlers never let an exception reach the page: bad input shows "Error: <message>" (the form's or
the engine's ``ValueError``); anything else shows a short note and its traceback goes to the
server log only.
"""
from __future__ import annotations

import inspect
import logging

import gradio as gr

from ..guidance import METHODS, SCFG_MODES
from .compare import Comparison, ModelInfo, run_comparison
from .form import Bounds, parse_request

log = logging.getLogger("attnguide.ui")
USER_ERRORS = (ValueError, TypeError, FloatingPointError)  # the engine's messages for bad input and NaN/inf
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # local fonts only: the page fetches nothing from the internet


def _error(exc: BaseException) -> str:
    if isinstance(exc, USER_ERRORS):
        return f"Error: {exc}"
    log.exception("generation failed")
    return f"Error: generation failed ({type(exc).__name__}); the server log has the details"


def theme_kwargs(where) -> dict:
    """gradio 6 takes the theme in ``launch``, gradio 4 and 5 in ``Blocks``."""
    params = inspect.signature(where).parameters
    return {"theme": gr.themes.Default(font=FONTS, font_mono=["ui-monospace", "monospace"])} if "theme" in params else {}


def no_share(component) -> dict:
    """No "share to Hugging Face" button (``buttons`` in gradio 6, ``show_share_button`` before)."""
    params = inspect.signature(component.__init__).parameters
    if "buttons" in params:
        return {"buttons": ["download", "fullscreen"]}
    return {"show_share_button": False} if "show_share_button" in params else {}


def build(pipe, info: ModelInfo, bounds: Bounds, title: str = "attnguide") -> gr.Blocks:
    settings = info.settings
    with gr.Blocks(title=title, analytics_enabled=False, **theme_kwargs(gr.Blocks.__init__)) as demo:
        gr.Markdown(f"## {title}: compare guidance methods\nSame prompt and seeds for every method; "
                    "S-CFG's token regions beside them, step by step.")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                methods = gr.CheckboxGroup(list(METHODS), value=["cfg", "scfg"], label=f"Methods (at most {bounds.max_methods})", elem_id="methods")
                with gr.Row():
                    seeds = gr.Textbox(value="0", label="Seed(s)", info="e.g. 0 or 0, 1, 2", elem_id="seeds")
                    steps = gr.Number(value=min(int(settings["num_inference_steps"]), bounds.max_steps), precision=0,
                                      label=f"Steps (1-{bounds.max_steps})", elem_id="steps")
                with gr.Row():
                    width = gr.Number(value=min(info.size, bounds.max_size), precision=0, label="Width", elem_id="width")
                    height = gr.Number(value=min(info.size, bounds.max_size), precision=0, label="Height", elem_id="height")
                with gr.Row():
                    w = gr.Number(value=settings["guidance_scale"], label="w (guidance scale, CFG/S-CFG)", elem_id="w")
                    s = gr.Number(value=settings["pag_scale"], label="s (PAG scale)", elem_id="s")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("PAG layers, S-CFG, windows", open=False):
                    layers = gr.Dropdown(list(info.self_layers), value=list(info.default_layers), multiselect=True,
                                         label="PAG layers (self-attention)", elem_id="pag_layers")
                    mode = gr.Radio(list(SCFG_MODES), value=SCFG_MODES[0], label="S-CFG mode", elem_id="scfg_mode")
                    levels = gr.CheckboxGroup([(f"latent/{f}", f) for f in info.levels], value=list(info.default_levels),
                                              label="S-CFG levels (none ticked: the model's default)", elem_id="scfg_levels")
                    with gr.Row():
                        cfg_start = gr.Slider(0, 1, 0, step=0.05, label="CFG window start")
                        cfg_stop = gr.Slider(0, 1, 1, step=0.05, label="CFG window stop")
                    with gr.Row():
                        pag_start = gr.Slider(0, 1, 0, step=0.05, label="PAG window start")
                        pag_stop = gr.Slider(0, 1, 1, step=0.05, label="PAG window stop")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    with gr.Column(scale=3):
                        gr.Markdown("**Results**: one row per seed, the methods side by side")
                        gallery = gr.Gallery(label="Results", show_label=False, columns=2,
                                             interactive=False, object_fit="contain", height="auto", elem_id="results",
                                             **no_share(gr.Gallery))
                        summary = gr.Markdown("", elem_id="summary")
                    with gr.Column(scale=2):
                        gr.Markdown("**S-CFG regions** of each prompt token (legend below the image)")
                        overlay = gr.Image(label="S-CFG regions", show_label=False, interactive=False, type="pil",
                                           elem_id="overlay", **no_share(gr.Image))
                        source = gr.Dropdown([], label="S-CFG masks of", elem_id="mask_source")
                        step = gr.Slider(0, 1, 0, step=1, label="Denoising step", elem_id="mask_step")

        def generate(prompt_, negative_, seeds_, steps_, width_, height_, methods_, w_, s_, layers_, mode_, levels_,
                     cfg_start_, cfg_stop_, pag_start_, pag_stop_, progress=gr.Progress()):
            empty = (None, [], "", gr.Dropdown(choices=[], value=None), gr.Slider(0, 1, 0), None)
            try:
                request = parse_request(bounds, prompt=prompt_, negative_prompt=negative_, seeds=seeds_, steps=steps_,
                                        height=height_, width=width_, methods=methods_, guidance_scale=w_, pag_scale=s_,
                                        pag_layers=layers_, scfg_mode=mode_, scfg_levels=levels_,
                                        cfg_window=(cfg_start_, cfg_stop_), pag_window=(pag_start_, pag_stop_),
                                        allowed_layers=info.self_layers, allowed_levels=info.levels)
                progress(0, desc="starting")
                result = run_comparison(pipe, request, lambda done, total, text: progress((done, total), desc=text))
            except Exception as exc:  # noqa: BLE001 - the page gets a message, the log the traceback
                return (_error(exc), *empty)
            sources, recorded = result.mask_sources(), result.mask_steps()
            last = recorded[-1] if recorded else 0
            return (
                f"Done: {len(request.methods)} method(s) x {len(request.seeds)} seed(s).",
                result,
                gr.Gallery(value=result.gallery(), columns=len(request.methods)),
                result.summary(),
                gr.Dropdown(choices=sources, value=sources[0] if sources else None),
                gr.Slider(minimum=recorded[0] if recorded else 0, maximum=max(last, 1), value=last, step=1,
                          label=f"Denoising step (0-{last})", interactive=bool(recorded)),
                result.overlay(sources[0], last) if sources else None,
            )

        def redraw(result: Comparison | None, source_, step_):
            if result is None or not source_:
                return None
            try:
                return result.overlay(source_, step_)
            except Exception as exc:  # noqa: BLE001
                log.warning("overlay: %s", _error(exc))
                return None

        inputs = [prompt, negative, seeds, steps, width, height, methods, w, s, layers, mode, levels,
                  cfg_start, cfg_stop, pag_start, pag_stop]
        run.click(generate, inputs, [status, state, gallery, summary, source, step, overlay], show_progress="full")
        prompt.submit(generate, inputs, [status, state, gallery, summary, source, step, overlay], show_progress="full")
        step.change(redraw, [state, source, step], overlay, show_progress="hidden")
        source.change(redraw, [state, source, step], overlay, show_progress="hidden")
    return demo
