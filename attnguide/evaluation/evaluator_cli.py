"""The ``attnguide evaluator`` commands: train the scene evaluator and check its accuracy."""
from __future__ import annotations

from pathlib import Path

import click
import torch

from attnguide.builtin import data

from .evaluator import DEFAULT_WEIGHTS, Evaluator
from .evaluator_train import evaluator_accuracy, train_evaluator


@click.group(name="evaluator")
def evaluator_cli() -> None:
    """Train and check the scene evaluator (object detector + Fréchet features)."""


@evaluator_cli.command("train")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_WEIGHTS,
              show_default=True, help="Weights file (.safetensors); the .json config goes beside it.")
@click.option("--steps", type=click.IntRange(min=1), default=800, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's).")
def train_command(out: Path, steps: int, batch: int, seed: int, threads: int | None) -> None:
    """Train the evaluator on rendered scenes of both splits and save it."""
    if threads:
        torch.set_num_threads(threads)
    evaluator = train_evaluator(out, steps=steps, batch=batch, seed=seed)
    info = evaluator.config["training"]
    click.echo(f"saved {out} ({info['seconds']} s, final losses {info['final_losses']})")


@evaluator_cli.command("accuracy")
@click.option("--n", "n_scenes", type=click.IntRange(min=1), default=500, show_default=True, help="Scenes to render.")
@click.option("--seed", type=int, default=12345, show_default=True)
@click.option("--split", type=click.Choice(data.SPLITS), default="heldout", show_default=True)
@click.option("--weights", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Weights file to check (default: the shipped evaluator).")
@click.option("--through-vae", "vae_model", default=None, metavar="MODEL",
              help="Pass every image through this diffusers model's autoencoder first ('builtin' or a folder): "
                   "the ceiling the autoencoder sets for generated images.")
def accuracy_command(n_scenes: int, seed: int, split: str, weights: Path | None, vae_model: str | None) -> None:
    """Per-attribute accuracy of the evaluator on rendered (real) scenes."""
    autoencoder = None
    if vae_model is not None:
        from ..pipelines import builtin_model_path, load_pipeline

        folder = builtin_model_path() if vae_model == "builtin" else Path(vae_model)
        if not (folder / "vae").is_dir():
            raise click.BadParameter(f"{str(folder)!r} has no vae folder", param_hint="--through-vae")
        autoencoder = load_pipeline(folder).vae  # whatever class the folder's model_index.json names
    result = evaluator_accuracy(n_scenes, seed, split, evaluator=Evaluator.load(weights), autoencoder=autoencoder)
    through = f" through the autoencoder of {vae_model}" if vae_model else ""
    click.echo(f"split={split} scenes={result['n_scenes']} objects={result['n_objects']} seed={seed}{through}")
    click.echo(f"{'attribute':<12} {'accuracy':>9}")
    for key in ("detected", "shape", "colour", "size", "position", "count"):
        click.echo(f"{key:<12} {100 * result[key]:>8.2f}%")
    click.echo(f"extra detections: {result['extra_detections']}; "
               f"mean position error: {result['mean_position_error']:.2f} px")
