"""``attnguide layers`` and ``attnguide train``: a model's attention layers, and training the built-in model."""
from __future__ import annotations

from pathlib import Path

import click

from ..builtin.model import PREDICTION_TYPES
from .app import InputError, main


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False), required=False)
@click.option("--all", "show_all", is_flag=True, help="Also list cross-attention layers.")
def layers(model, show_all) -> None:
    """List a model's attention layers (names usable in --pag-layers) and S-CFG levels.

    Works on U-Nets (SD, SDXL, the built-in model) and transformers (SD3, PixArt, Sana, HunyuanDiT, Flux).

    \b
    Example:
      attnguide layers ./my-sd15
    """
    from .. import attention
    from ..pipelines import recommended_settings
    from ..transformer_attention import is_transformer

    path = Path(model) if model else None
    denoiser = _load_denoiser(path)
    transformer = is_transformer(denoiser)
    settings = recommended_settings(path)
    recommended = tuple(settings["scfg_levels"] or ())
    pag_layers = ",".join(settings["pag_layers"])
    levels = () if transformer else (recommended or attention.default_scfg_levels(denoiser))
    click.echo(f"{'layer':62s} {'kind':6s} {'factor':>6s} {'heads':>5s}" + ("" if transformer else "  s-cfg"))
    for layer in attention.list_layers(denoiser):
        if layer.is_cross and not show_all:
            continue
        kind = getattr(layer, "kind", "cross" if layer.is_cross else "self")
        mark = "" if transformer else ("  yes" if layer.factor in levels else "")
        click.echo(f"{layer.name:62s} {kind:6s} {layer.factor:>6d} {layer.heads:>5d}{mark}")
    if transformer:
        click.echo(f"default PAG layers: {pag_layers} (mid: the middle block of the main block list)")
    else:
        source = "recommended by the model's attnguide.json" if recommended else "default"
        click.echo(f"S-CFG levels (downsampling factors, {source}): {levels}; default PAG layers: "
                   f"{pag_layers}")


def _load_denoiser(path: Path | None):
    """The U-Net or transformer of a diffusers folder (or of a denoiser folder itself), safetensors only."""
    import json

    import diffusers

    from ..pipelines import ModelLoadError, builtin_model_path, check_safetensors, load_error_reason, quiet

    path = path or builtin_model_path()
    folder = next((path / sub for sub in ("unet", "transformer") if (path / sub / "config.json").is_file()), path)
    if not (folder / "config.json").is_file():
        raise InputError(f"MODEL: {str(path)!r} has no unet/config.json or transformer/config.json "
                         "(a diffusers folder or a denoiser folder expected)")
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name", "UNet2DConditionModel")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise InputError(f"MODEL: {str(folder / 'config.json')!r} names {class_name!r}, which is not a diffusers model class")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)
    try:
        with quiet():
            return cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelLoadError(f"model: could not load {str(folder)!r}: {load_error_reason(exc)}") from exc


@main.command()
@click.option("--out", default="runs/builtin", help="Run folder (checkpoints, log); rerun the same command to resume.")
@click.option("--export", default=None, help="Where to write the diffusers model [default: OUT/model; never the installed package unless named here].")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None, help="Continue from this exported model folder (its weights and patch autoencoder).")
@click.option("--steps", type=click.IntRange(1), default=5000, help="Diffusion training steps (the cosine schedule spans them).")
@click.option("--batch", type=click.IntRange(1), default=64)
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True), default=3e-4)
@click.option("--warmup", type=click.IntRange(0), default=200, help="Linear learning-rate warm-up steps.")
@click.option("--prediction", type=click.Choice(PREDICTION_TYPES), default="v_prediction", show_default=True,
              help="What the U-Net predicts (fixed when a run starts; a continuation may switch from its --init-from model's).")
@click.option("--grounding", type=click.FloatRange(0), default=0.2, help="Weight of each grounding term (token, pixel, self); 0 turns them off.")
@click.option("--pool", type=click.IntRange(1), default=32000, help="Rendered training scenes.")
@click.option("--checkpoint-every", type=click.IntRange(1), default=250)
@click.option("--max-minutes", type=click.FloatRange(0), default=0.0, help="Stop after a checkpoint once this much time passed (0: no limit).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--seed", type=int, default=0)
def train(out, export, init_from, steps, batch, lr, warmup, prediction, grounding, pool, checkpoint_every, max_minutes, device, seed) -> None:
    """Train (or resume training) the built-in model on synthetic scenes.

    \b
    Examples:
      attnguide train --out runs/builtin --max-minutes 120
      attnguide train --out runs/more --init-from runs/builtin/model --steps 3000
    """
    from ..builtin.train import TrainConfig
    from ..builtin.train import train as run_training

    cfg = TrainConfig(out=out, export=export, init_from=init_from, steps=steps, batch=batch, lr=lr, warmup=warmup,
                      prediction=prediction, grounding=grounding, pool=pool, checkpoint_every=checkpoint_every, max_minutes=max_minutes,
                      device=device, seed=seed)
    click.echo(f"model written to {run_training(cfg)}")
