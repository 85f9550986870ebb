"""The ``attnguide`` command line."""
from __future__ import annotations

import re
from pathlib import Path

import click

from .guidance import METHODS, SCFG_MODES


def _methods(value: tuple[str, ...]) -> list[str]:
    methods = [m.strip() for v in value for m in v.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise click.BadParameter(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}", param_hint="--method")
    return methods or ["scfg+pag"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="attnguide")
def main() -> None:
    """Training-free attention guidance (CFG, PAG, S-CFG) for diffusers U-Net models."""


@main.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None, help="Local diffusers folder [default: the built-in model].")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt; repeat for several.")
@click.option("--negative-prompt", default=None, help="Negative prompt (applies to every prompt).")
@click.option("--method", "methods", multiple=True, default=("scfg+pag",), help=f"Comma list or repeated: {', '.join(METHODS)}.")
@click.option("--seed", type=int, default=0, help="Image i of a prompt uses seed + i.")
@click.option("--n", "num_images", type=click.IntRange(1, 64), default=1, help="Images per prompt.")
@click.option("--steps", type=click.IntRange(1, 1000), default=30, help="Denoising steps.")
@click.option("--guidance-scale", type=click.FloatRange(0, 100), default=None, help="CFG/S-CFG scale w [default: 7.5, or the model's recommendation].")
@click.option("--pag-scale", type=click.FloatRange(0, 100), default=3.0, help="PAG scale s.")
@click.option("--pag-layers", default="mid", help="Comma list of self-attention layers or patterns (see `attnguide layers`).")
@click.option("--scfg-mode", type=click.Choice(SCFG_MODES), default="reference", help="S-CFG arithmetic.")
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
             scfg_mode, height, width, init_image, strength, mask_image, masks, device, dtype, out) -> None:
    """Generate images, one PNG each, plus a comparison grid when several methods are given.

    \b
    Examples:
      attnguide generate --prompt "a red circle to the left of a blue square" --method scfg+pag --n 4
      attnguide generate --prompt "a small green cross" --method cfg,pag,cfg+pag,scfg,scfg+pag --masks
      attnguide generate --model ./my-sd15 --prompt "a photo of a cat" --method cfg+pag --device cuda --dtype float16
      attnguide generate --prompt "a blue square" --image in.png --strength 0.6 --method cfg+pag
      attnguide generate --prompt "a green cross" --image in.png --mask-image mask.png --method scfg
    """
    from . import sampling
    from .pipelines import load_pipeline, recommended_settings
    from .report import image_grid

    methods = _methods(methods)
    if mask_image is not None and init_image is None:
        raise click.BadParameter("--mask-image needs --image (the picture to inpaint)", param_hint="--mask-image")
    pipe = load_pipeline(model, device=device, dtype=dtype)
    w = guidance_scale if guidance_scale is not None else recommended_settings(pipe)["guidance_scale"]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for method in methods:
        result = sampling.generate(
            pipe, list(prompts), method=method, guidance_scale=w, pag_scale=pag_scale,
            pag_layers=[p for p in pag_layers.split(",") if p], num_inference_steps=steps,
            negative_prompt=negative_prompt, height=height, width=width, num_images_per_prompt=num_images,
            seed=seed, return_masks=masks, mask_steps=None, scfg={"mode": scfg_mode},
            image=init_image, strength=strength, mask_image=mask_image,
        )
        for k, image in enumerate(result.images):
            p, i = divmod(k, num_images)
            name = f"{_slug(prompts[p])}_{method.replace('+', '-')}_seed{seed + i}"
            image.save(out_dir / f"{name}.png")
            if masks and result.masks is not None:
                result.masks.render(k, image).save(out_dir / f"{name}_masks.png")
        rows.append(result.images)
        labels.append(method)
    if len(methods) > 1:
        image_grid(rows, labels).save(out_dir / "grid.png")
    click.echo(f"wrote {sum(len(r) for r in rows)} images to {out_dir}/" + (" (and grid.png)" if len(methods) > 1 else ""))


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--all", "show_all", is_flag=True, help="Also list cross-attention layers.")
def layers(model, show_all) -> None:
    """List a model's attention layers (names usable in --pag-layers) and S-CFG levels.

    \b
    Example:
      attnguide layers ./my-sd15
    """
    from diffusers import UNet2DConditionModel

    from . import attention
    from .pipelines import builtin_model_path

    path = Path(model) if model else builtin_model_path()
    unet = UNet2DConditionModel.from_pretrained(path / "unet" if (path / "unet").is_dir() else path, use_safetensors=True)
    levels = attention.default_scfg_levels(unet)
    click.echo(f"{'layer':62s} {'kind':6s} {'factor':>6s} {'heads':>5s}  s-cfg")
    for layer in attention.list_layers(unet):
        if layer.is_cross and not show_all:
            continue
        kind = "cross" if layer.is_cross else "self"
        mark = "yes" if layer.factor in levels else ""
        click.echo(f"{layer.name:62s} {kind:6s} {layer.factor:>6d} {layer.heads:>5d}  {mark}")
    click.echo(f"default S-CFG levels (downsampling factors): {levels}; default PAG layers: mid")


@main.command()
@click.option("--out", default="runs/builtin", help="Run folder (checkpoints, log); rerun the same command to resume.")
@click.option("--export", default=None, help="Where to write the diffusers model [default: OUT/model; never the installed package unless named here].")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None, help="Continue from this exported model folder (its weights and patch autoencoder).")
@click.option("--steps", type=click.IntRange(1), default=5000, help="Diffusion training steps (the cosine schedule spans them).")
@click.option("--batch", type=click.IntRange(1), default=64)
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True), default=3e-4)
@click.option("--warmup", type=click.IntRange(0), default=200, help="Linear learning-rate warm-up steps.")
@click.option("--grounding", type=click.FloatRange(0), default=0.1, help="Weight of each grounding term (token, pixel, self); 0 turns them off.")
@click.option("--pool", type=click.IntRange(1), default=32000, help="Rendered training scenes.")
@click.option("--checkpoint-every", type=click.IntRange(1), default=250)
@click.option("--max-minutes", type=click.FloatRange(0), default=0.0, help="Stop after a checkpoint once this much time passed (0: no limit).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--seed", type=int, default=0)
def train(out, export, init_from, steps, batch, lr, warmup, grounding, pool, checkpoint_every, max_minutes, device, seed) -> None:
    """Train (or resume training) the built-in model on synthetic scenes.

    \b
    Examples:
      attnguide train --out runs/builtin --max-minutes 120
      attnguide train --out runs/more --init-from runs/builtin/model --steps 3000
    """
    from .builtin.train import TrainConfig
    from .builtin.train import train as run_training

    cfg = TrainConfig(out=out, export=export, init_from=init_from, steps=steps, batch=batch, lr=lr, warmup=warmup,
                      grounding=grounding, pool=pool, checkpoint_every=checkpoint_every, max_minutes=max_minutes,
                      device=device, seed=seed)
    click.echo(f"model written to {run_training(cfg)}")


def _attach_optional_commands() -> None:
    """Commands whose modules live in sub-packages; attached when those modules are present."""
    import importlib

    for module, attr in (("attnguide.evaluation.evaluator", "evaluator_cli"), ("attnguide.evaluation.segcheck", "segcheck"),
                         ("attnguide.evaluation.bench", "bench"), ("attnguide.evaluation.harness", "eval_cli")):
        try:
            command = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        main.add_command(command)


_attach_optional_commands()

if __name__ == "__main__":
    main()
