"""The ``attnguide ui`` command: serve the comparison page on this machine."""
from __future__ import annotations

import inspect
import logging
import os

import click

MISSING_GRADIO = "attnguide ui needs gradio, which is not installed: pip install 'attnguide[ui]'"


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None, help="Local diffusers folder [default: the built-in model].")
@click.option("--host", default="127.0.0.1", help="Address to listen on; 0.0.0.0 opens the page to your network.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860)
@click.option("--device", default="cpu", help="torch device, e.g. cpu or cuda.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32")
@click.option("--max-steps", type=click.IntRange(1), default=100, help="Most denoising steps per request.")
@click.option("--max-size", type=click.IntRange(1), default=512, help="Largest image width/height in pixels.")
@click.option("--max-images", type=click.IntRange(1), default=12, help="Most images per request (seeds x methods).")
@click.option("--max-methods", type=click.IntRange(1), default=6, help="Most methods per request.")
@click.option("--max-queue", type=click.IntRange(1), default=16, help="Most requests waiting; one runs at a time.")
def ui(model, host, port, device, dtype, max_steps, max_size, max_images, max_methods, max_queue) -> None:
    """A web page to compare guidance methods side by side, with the masks S-CFG sees.

    \b
    Examples:
      attnguide ui                      # the built-in model, http://127.0.0.1:7860
      attnguide ui --model ./my-sd15 --device cuda --dtype float16 --max-size 768
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise click.ClickException(MISSING_GRADIO) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("attnguide.ui").warning("listening on %s: anyone who can reach this machine can use the page "
                                                  "(there is no password)", host)
    demo = make_app(model, device=device, dtype=dtype, bounds=dict(max_steps=max_steps, max_size=max_size,
                    max_images=max_images, max_methods=max_methods), max_queue=max_queue)
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=False,
                **launch_kwargs(demo))


def make_app(model=None, *, device="cpu", dtype="float32", bounds=None, max_queue=16, pipe=None):
    """The queued gradio app for a model folder (or an already loaded ``pipe``)."""
    from ..pipelines import load_pipeline
    from .compare import model_info
    from .form import Bounds
    from .layout import build

    pipe = pipe if pipe is not None else load_pipeline(model, device=device, dtype=dtype)
    demo = build(pipe, model_info(pipe), Bounds(**(bounds or {})))
    return demo.queue(default_concurrency_limit=1, max_size=max_queue)


def launch_kwargs(demo) -> dict:
    """Options of ``launch`` that differ between gradio versions: no API page link, no server-side
    rendering (no Node process), no MCP server, the theme where gradio 6 takes it."""
    from .layout import theme_kwargs

    params = inspect.signature(demo.launch).parameters
    wanted = {"footer_links": ["gradio", "settings"], "show_api": False, "ssr_mode": False, "mcp_server": False}
    return {k: v for k, v in wanted.items() if k in params} | theme_kwargs(demo.launch)
