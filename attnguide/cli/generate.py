"""``attnguide generate``: images, a comparison grid and mask overlays from the command line."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import click

from .app import METHODS, SCFG_LEVELS, SCFG_MODES, InputError, LazyChoice, LazyHelpOption, debugging, main, one_line


def _methods(value: tuple[str, ...]) -> list[str | None]:
    """The methods asked for; ``[None]`` (the model's recommendation) when ``--method`` is not given."""
    if not value:
        return [None]
    methods = [m.strip() for v in value for m in v.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise click.BadParameter(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}", param_hint="--method")
    if not methods:
        raise click.BadParameter(f"no method given; choose from {', '.join(METHODS)}", param_hint="--method")
    return list(dict.fromkeys(methods))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def _file_stems(prompts: Sequence[str]) -> list[str]:
    """One file-name stem per prompt, unique: the slug, plus a short hash of the prompt where two
    different prompts share a slug, plus a counter where a prompt is repeated."""
    slugs = [_slug(p) for p in prompts]
    stems, seen = [], {}
    for prompt, slug in zip(prompts, slugs):
        clash = any(s == slug and q != prompt for q, s in zip(prompts, slugs))
        stem = f"{slug}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}" if clash else slug
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _finite(ctx, param, value):
    if value is not None and value != value:  # NaN passes click's FloatRange
        raise click.BadParameter("must be a finite number, got nan", ctx=ctx, param=param)
    return value


def _writable_dir(path: Path, option: str) -> None:
    """Create ``path`` if needed and check a file can be written there (before any work)."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".attnguide-write-check-"):
            pass
    except OSError as exc:
        raise InputError(f"{option}: cannot write to {str(path)!r}: {exc.strerror or exc}") from None


_GENERATE_OPTIONS = {"guidance_scale": "--guidance-scale", "pag_scale": "--pag-scale", "pag_layers": "--pag-layers",
                     "num_inference_steps": "--steps", "num_images_per_prompt": "--n", "negative_prompt": "--negative-prompt",
                     "height": "--height", "width": "--width", "seed": "--seed", "image": "--image", "strength": "--strength",
                     "mask_image": "--mask-image", "prompt": "--prompt", "model": "--model", "device": "--device",
                     "dtype": "--dtype", "scfg": "--scfg-mode", "scfg mode": "--scfg-mode",
                     "scfg levels": "--scfg-levels"}


@main.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None, help="Local diffusers folder [default: the built-in model].")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt; repeat for several.")
@click.option("--negative-prompt", default=None, help="Negative prompt (applies to every prompt; used by the methods with CFG).")
@click.option("--method", "methods", multiple=True, default=(), cls=LazyHelpOption,
              help="Comma list or repeated: {methods} [default: the model's recommendation, else scfg+pag].")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Image i of a prompt uses seed + i (seeds are 32-bit).")
@click.option("--n", "num_images", type=click.IntRange(1, 64), default=1, help="Images per prompt.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Denoising steps [default: the model's recommendation, else 50].")
@click.option("--guidance-scale", type=click.FloatRange(0, 100), default=None, callback=_finite,
              help="CFG/S-CFG scale w [default: the model's recommendation, else 7.5].")
@click.option("--pag-scale", type=click.FloatRange(0, 100), default=None, callback=_finite,
              help="PAG scale s [default: the model's recommendation, else 3.0].")
@click.option("--pag-layers", default=None,
              help="Comma list of self-attention layers or patterns (see `attnguide layers`) [default: the model's recommendation, else mid].")
@click.option("--scfg-mode", type=LazyChoice(SCFG_MODES), default="reference", help="S-CFG arithmetic.")
@click.option("--scfg-levels", type=SCFG_LEVELS, default=None,
              help="Downsampling factors whose attention S-CFG reads, e.g. 1,2 (see `attnguide layers`) "
                   "[default: the model's recommendation, else latent/4 and latent/8].")
@click.option("--height", type=click.IntRange(1), default=None)
@click.option("--width", type=click.IntRange(1), default=None)
@click.option("--image", "init_image", type=click.Path(exists=True, dir_okay=False), default=None, help="Start from this image (img2img).")
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True), default=0.6, help="img2img/inpainting: how much of --image is re-noised.")
@click.option("--mask-image", type=click.Path(exists=True, dir_okay=False), default=None, help="Inpaint where this mask is white (needs --image).")
@click.option("--masks", is_flag=True, help="Also save S-CFG mask overlays (last step).")
@click.option("--device", default="cpu", help="torch device, e.g. cpu or cuda.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32")
@click.option("--out", type=click.Path(file_okay=False), default="outputs", help="Output folder.")
def generate(model, prompts, negative_prompt, methods, seed, num_images, steps, guidance_scale, pag_scale, pag_layers,
             scfg_mode, scfg_levels, height, width, init_image, strength, mask_image, masks, device, dtype, out) -> None:
    """Generate images, one PNG each, plus a comparison grid when several methods are given.

    \b
    Examples:
      attnguide generate --prompt "a red circle to the left of a blue square" --method scfg+pag --n 4
      attnguide generate --prompt "a small green cross" --method cfg,pag,cfg+pag,scfg,scfg+pag --masks
      attnguide generate --model ./my-sd15 --prompt "a photo of a cat" --method cfg+pag --device cuda --dtype float16
      attnguide generate --prompt "a blue square" --image in.png --strength 0.6 --method cfg+pag
      attnguide generate --prompt "a green cross" --image in.png --mask-image mask.png --method scfg
    """
    methods = _methods(methods)
    if mask_image is not None and init_image is None:
        raise click.BadParameter("--mask-image needs --image (the picture to inpaint)", param_hint="--mask-image")
    if seed + num_images - 1 > 2**32 - 1:
        raise click.BadParameter(f"seed + {num_images - 1} (image {num_images} of a prompt) must be <= {2**32 - 1}", param_hint="--seed")
    out_dir = Path(out)
    _writable_dir(out_dir, "--out")  # before loading or sampling anything
    from .. import sampling
    from ..guidance import REGISTRY
    from ..pipelines import check_device, load_pipeline, resolve_settings
    from ..report import image_grid
    from ..validation import with_option_name

    try:
        check_device(device)
        pipe = load_pipeline(model, device=device, dtype=dtype)
    except ValueError as exc:
        if debugging():
            raise
        raise InputError(with_option_name(one_line(exc), _GENERATE_OPTIONS)) from None
    layers = None if pag_layers is None else [p for p in pag_layers.split(",") if p]
    settings = resolve_settings(pipe, guidance_scale=guidance_scale, pag_scale=pag_scale, pag_layers=layers,
                                num_inference_steps=steps)
    methods = [settings["method"] if m is None else m for m in methods]
    stems = _file_stems(list(prompts))
    rows, labels = [], []
    for method in methods:
        try:
            result = sampling.generate(
                pipe, list(prompts), method=method, guidance_scale=settings["guidance_scale"], pag_scale=settings["pag_scale"],
                pag_layers=settings["pag_layers"], num_inference_steps=settings["num_inference_steps"],
                negative_prompt=negative_prompt if REGISTRY[method].uses_cfg else None, height=height, width=width,
                num_images_per_prompt=num_images, seed=seed, return_masks=masks, mask_steps=None, scfg={"mode": scfg_mode, "levels": scfg_levels},
                image=init_image, strength=strength, mask_image=mask_image,
            )
        except (ValueError, TypeError) as exc:
            if debugging():
                raise
            raise InputError(with_option_name(one_line(exc), _GENERATE_OPTIONS)) from None
        for k, image in enumerate(result.images):
            p, i = divmod(k, num_images)
            name = f"{stems[p]}_{method.replace('+', '-')}_seed{seed + i}"
            image.save(out_dir / f"{name}.png")
            if masks and result.masks is not None:
                result.masks.render(k, image).save(out_dir / f"{name}_masks.png")
        rows.append(result.images)
        labels.append(method)
    if len(methods) > 1:
        image_grid(rows, labels).save(out_dir / "grid.png")
    click.echo(f"wrote {sum(len(r) for r in rows)} images to {out_dir}/" + (" (and grid.png)" if len(methods) > 1 else ""))
