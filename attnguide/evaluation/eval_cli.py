"""The ``attnguide eval`` commands: ``run`` (a resumable, shardable sweep), ``report`` and ``compare``.

The library modules (``sweep``, ``settings``, ``runner``, ``summary``) raise ``ValueError`` and the
errors of ``errors``; this module turns them into one-line messages (exit 2 for bad input, 1 for
an unusable folder).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click

from ..cli import SCFG_LEVELS, InputError, RunFailure
from ..guidance import METHODS, SCFG_MODES
from .errors import BadInput, EvalFolderError
from .runner import run_eval
from .settings import DEFAULT_BUILTIN_PROMPTS, EvalSettings, load_prompts
from .summary import report, summary_markdown
from .sweep import SEED_STRIDE, parse_configs, parse_scales


@contextlib.contextmanager
def _errors_as_messages() -> Iterator[None]:
    """The harness's errors as click errors: one line, exit code 2 (bad input) or 1 (folder)."""
    try:
        yield
    except BadInput as exc:
        raise InputError(str(exc)) from None
    except EvalFolderError as exc:
        raise RunFailure(str(exc)) from None


@click.group(name="eval", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def eval_cli() -> None:
    """Evaluate guidance methods over prompt sets: resumable, shardable sweeps with summaries and plots."""


@eval_cli.command("run")
@click.option("--methods", "methods", multiple=True, default=("none,cfg,pag,cfg+pag,scfg,scfg+pag",),
              help="Comma list (or repeat) of METHOD or METHOD@SCALES. METHOD: " + ", ".join(METHODS) + ". "
                   "SCALES: cfg@W, scfg@W, pag@S, cfg+pag@W/S (or cfg+pag@W: S from --pag-scale), scfg+pag@W/S.")
@click.option("--scales", default=None,
              help="Comma list of scales swept for each METHOD given without '@': w for cfg, scfg, cfg+pag, scfg+pag "
                   "(s then fixed by --pag-scale), s for pag; none ignores it. Default: the model's recommended w "
                   "(its attnguide.json; the built-in model ships one; else 7.5), and --pag-scale for pag.")
@click.option("--pag-scale", type=click.FloatRange(0), default=None,
              help="s of pag, cfg+pag and scfg+pag when not given as METHOD@S or METHOD@W/S [default: the model's recommendation, else 3].")
@click.option("--prompts", default="builtin", help="'builtin' (held-out scenes with ground truth: all metrics) or a text file, one prompt a line (model-agnostic metrics only).")
@click.option("--num-prompts", type=click.IntRange(1), default=None, help=f"Prompts to use [default: {DEFAULT_BUILTIN_PROMPTS} for builtin, all of a file].")
@click.option("--prompt-seed", type=int, default=1000, help="Seed of the built-in held-out scenes.")
@click.option("--n", "n", type=click.IntRange(1, SEED_STRIDE), default=1, help="Images per prompt (>= 2 for diversity).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder; rerun the same command to resume.")
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None, help="Local diffusers folder [default: the built-in model].")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Denoising steps [default: the model's recommendation, else 50].")
@click.option("--seed", type=int, default=0, help="Base seed: sample k of prompt p uses seed + 1000 p + k, for every method.")
@click.option("--batch", type=click.IntRange(1), default=8, help="Images per U-Net batch (and per work unit sharded across processes).")
@click.option("--pag-layers", default=None,
              help="Comma list of self-attention layers or patterns PAG perturbs [default: the model's recommendation, else mid].")
@click.option("--scfg-mode", type=click.Choice(SCFG_MODES), default="reference", help="S-CFG arithmetic.")
@click.option("--scfg-levels", type=SCFG_LEVELS, default=None,
              help="Downsampling factors whose attention S-CFG reads, e.g. 1,2 (see `attnguide layers`) "
                   "[default: the model's recommendation, else latent/4 and latent/8].")
@click.option("--negative-prompt", default=None, help="Negative prompt for every prompt.")
@click.option("--height", type=click.IntRange(1), default=None)
@click.option("--width", type=click.IntRange(1), default=None)
@click.option("--device", default="auto", help="torch device; auto: the process's accelerate device, else cuda if available, else cpu.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32")
@click.option("--evaluator", type=click.Path(dir_okay=False), default=None, help="Scene evaluator weights (.safetensors) [default: the shipped one].")
@click.option("--clip", type=click.Path(file_okay=False), default=None, help="Local transformers CLIP folder (safetensors) for CLIP score; never downloaded.")
@click.option("--min-real", type=click.IntRange(2), default=500, help="At least this many real (rendered) images for the Fréchet distance (never fewer than generated per config).")
@click.option("--grid-prompts", type=click.IntRange(0), default=4, help="Prompts (sample 0) in the sample grid; S-CFG masks are saved for them.")
@click.option("--no-report", is_flag=True, help="Do not write summary and plots at the end (see `attnguide eval report`).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_command(methods, scales, pag_scale, prompts, num_prompts, prompt_seed, n, out, model, steps, seed, batch,
                pag_layers, scfg_mode, scfg_levels, negative_prompt, height, width, device, dtype, evaluator, clip, min_real,
                grid_prompts, no_report, quiet) -> None:
    """Generate and score images for every (method, scale) x prompt x sample; resumable and shardable.

    \b
    Examples:
      attnguide eval run --out outputs/eval --num-prompts 40 --steps 20
      attnguide eval run --methods cfg,scfg --scales 2,3.5,5,7.5 --n 4 --out outputs/sweep
      attnguide eval run --methods cfg@5,pag@2,cfg+pag@5/1.5 --prompts prompts.txt --model ./sd15 --out outputs/sd
      accelerate launch --multi_gpu --num_processes 2 -m attnguide.cli eval run --out outputs/eval
    \b
    Sharding: under `accelerate launch --multi_gpu --num_processes N` (torchrun; works on
    CPU-only machines too, with gloo) or `torchrun --nproc_per_node N -m attnguide.cli eval run`,
    work unit i (a batch of --batch jobs) runs in process i % N; the main process merges the
    per-job records after a barrier, identical to a one-process run apart from timing.
    (`accelerate launch --cpu` starts one process unless an MPI hostfile is configured.)
    """
    from ..pipelines import resolve_settings

    try:
        recommended = resolve_settings(model, pag_scale=pag_scale, num_inference_steps=steps)
        configs = parse_configs(methods, parse_scales(scales), recommended["pag_scale"], recommended["guidance_scale"])
        settings = EvalSettings(
            out=Path(out), configs=configs, prompts=prompts, num_prompts=num_prompts, prompt_seed=prompt_seed, n=n,
            model=model, steps=recommended["num_inference_steps"], seed=seed, batch=batch, pag_layers=None if pag_layers is None else tuple(p for p in pag_layers.split(",") if p),
            scfg_mode=scfg_mode, scfg_levels=scfg_levels, negative_prompt=negative_prompt, height=height, width=width, device=device, dtype=dtype,
            evaluator=evaluator, clip=clip, min_real=min_real, grid_prompts=grid_prompts, progress=not quiet,
            report=not no_report,
        )
        load_prompts(prompts, num_prompts, prompt_seed)  # fail on a bad prompt file before loading anything
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    with _errors_as_messages():
        outcome = run_eval(settings)
    if outcome.summary is not None:
        click.echo(summary_markdown(outcome.summary, outcome.notes, outcome.paired))
    click.echo(f"{outcome.computed} images computed by this process, {outcome.done_before} of its jobs were already done "
               f"({outcome.total_jobs} jobs in the run); results in {out}/")


@eval_cli.command("report")
@click.argument("directory", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--evaluator", type=click.Path(dir_okay=False, exists=True), default=None, help="Evaluator weights [default: the run's].")
@click.option("--min-real", type=click.IntRange(2), default=None, help="Real images for the Fréchet distance [default: the run's].")
@click.option("--no-plots", is_flag=True)
def report_command(directory, evaluator, min_real, no_plots) -> None:
    """Rebuild records.jsonl, summary (CSV, Markdown, JSON) and plots of DIR from its saved records.

    \b
    Example:
      attnguide eval report outputs/eval
    """
    with _errors_as_messages():
        rows, notes, paired = report(directory, evaluator_path=evaluator, min_real=min_real, plots=not no_plots,
                                     progress=True)
    click.echo(summary_markdown(rows, notes, paired))


@eval_cli.command("compare")
@click.argument("dir_a", metavar="DIR_A", type=click.Path(exists=True, file_okay=False))
@click.argument("dir_b", metavar="DIR_B", type=click.Path(exists=True, file_okay=False))
@click.option("--pair", "pairs", multiple=True,
              help="Config to compare: LABEL (in both runs) or LABEL_A=LABEL_B; repeat for several "
                   "[default: every config both runs have].")
def compare_command(dir_a, dir_b, pairs) -> None:
    """Compare two runs image by image (A − B on the same prompts and seeds): two models,
    checkpoints or settings. Reads both folders, writes nothing.

    \b
    Example:
      attnguide eval compare outputs/eval-new outputs/eval-old --pair cfg@5
    """
    from .compare import compare_markdown, compare_runs, parse_pairs

    with _errors_as_messages():
        rows = compare_runs(dir_a, dir_b, parse_pairs(pairs))
    click.echo(compare_markdown(rows, dir_a, dir_b))
