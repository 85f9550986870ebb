"""The ``attnguide`` command line."""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path

import click

# Nothing here imports torch at start-up: `attnguide --help` stays fast. Commands import what they need.


class _LazyNames(Sequence):
    """A tuple of names read from a module on first use (e.g. the method registry, which imports torch)."""

    def __init__(self, module: str, attr: str) -> None:
        self._module, self._attr, self._value = module, attr, None

    def _get(self) -> tuple:
        if self._value is None:
            self._value = tuple(getattr(importlib.import_module(self._module), self._attr))
        return self._value

    def __getitem__(self, index):
        return self._get()[index]

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


METHODS = _LazyNames("attnguide.guidance", "METHODS")
SCFG_MODES = _LazyNames("attnguide.guidance", "SCFG_MODES")


class _LazyHelpOption(click.Option):
    """An option whose help text is built when help is shown (``help`` may contain ``{methods}``)."""

    def get_help_record(self, ctx):
        if self.help and "{methods}" in self.help:
            self.help = self.help.replace("{methods}", ", ".join(METHODS))
        return super().get_help_record(ctx)


class _LazyChoice(click.Choice):
    """click.Choice over a ``_LazyNames`` (read when the option is parsed or its help shown)."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = names
        self.case_sensitive = True

    @property
    def choices(self) -> tuple:
        return tuple(self._names)


class InputError(click.ClickException):
    """Bad input found after option parsing: one line, exit code 2."""

    exit_code = 2


class RunFailure(click.ClickException):
    """A failure while working: one line, exit code 1."""

    exit_code = 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _debugging() -> bool:
    """``attnguide --debug`` (or ATTNGUIDE_DEBUG=1): let exceptions through with their traceback."""
    ctx = click.get_current_context(silent=True)
    return bool((ctx is not None and ctx.find_root().params.get("debug")) or os.environ.get("ATTNGUIDE_DEBUG"))


def _as_click_error(exc: BaseException) -> click.ClickException:
    from .validation import NonFiniteError

    hint = " (run `attnguide --debug ...` for the traceback)"
    if isinstance(exc, NonFiniteError):
        return RunFailure(_one_line(exc))
    if isinstance(exc, (ValueError, TypeError, LookupError)):
        return InputError(_one_line(exc))
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return RunFailure(f"out of memory: {_one_line(exc)}; use fewer or smaller images (--n, --height, --width)")
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return RunFailure(f"{exc.strerror or _one_line(exc)}{where}")
    return RunFailure(f"{type(exc).__name__}: {_one_line(exc)}{hint}")


def _command_info(module: str, attr: str) -> tuple[str, str] | None:
    """(command name, help) of the click command ``attr`` in ``module``, read from its source
    without importing it; None when it cannot be read that way."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name != attr:
            continue
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr in ("command", "group")):
                continue
            name = next((a.value for a in deco.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)), None)
            name = name or next((k.value.value for k in deco.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)), None)
            name = name or attr.replace("_", "-")
            return name, ast.get_docstring(node) or ""
    return None


class _Main(click.Group):
    """The ``attnguide`` group: sub-packages' commands load on first use, and errors print as one
    line (exit 2 for bad input, 1 for a failure) unless ``--debug``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, tuple[str, str, str]] = {}

    def add_lazy_command(self, module: str, attr: str) -> bool:
        """Register ``module.attr`` without importing it; False when the module is absent."""
        try:
            if importlib.util.find_spec(module) is None:
                return False
        except ModuleNotFoundError:  # its package is absent
            return False
        info = _command_info(module, attr)
        if info is None:  # not readable from source: import it now
            self.add_command(getattr(importlib.import_module(module), attr))
            return True
        self.lazy[info[0]] = (module, attr, info[1])
        return True

    def list_commands(self, ctx) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx, cmd_name):
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, attr, _ = self.lazy[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx, formatter) -> None:
        from click.utils import make_default_short_help

        limit = formatter.width - 6 - max((len(n) for n in self.list_commands(ctx)), default=0)
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                command = self.commands[name]
                if command.hidden:
                    continue
                rows.append((name, command.get_short_help_str(limit)))
            else:
                rows.append((name, make_default_short_help(self.lazy[name][2].split("\f")[0], limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if _debugging():
                raise
            raise _as_click_error(exc) from None


def _methods(value: tuple[str, ...]) -> list[str]:
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
                     "dtype": "--dtype", "scfg": "--scfg-mode", "scfg mode": "--scfg-mode"}


def _cli_names(message: str, options: dict[str, str]) -> str:
    """A message that starts with an API parameter name, starting with the option's name instead."""
    for name in sorted(options, key=len, reverse=True):
        if message.startswith(name) and not message[len(name):len(name) + 1].isalnum() and message[len(name):len(name) + 1] != "_":
            return options[name] + message[len(name):]
    return message


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="attnguide")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an error (also: ATTNGUIDE_DEBUG=1).")
def main(debug: bool) -> None:
    """Training-free attention guidance (CFG, PAG, S-CFG) for diffusers U-Net models."""


@main.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None, help="Local diffusers folder [default: the built-in model].")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt; repeat for several.")
@click.option("--negative-prompt", default=None, help="Negative prompt (applies to every prompt; used by the methods with CFG).")
@click.option("--method", "methods", multiple=True, default=("scfg+pag",), cls=_LazyHelpOption, help="Comma list or repeated: {methods}.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Image i of a prompt uses seed + i (seeds are 32-bit).")
@click.option("--n", "num_images", type=click.IntRange(1, 64), default=1, help="Images per prompt.")
@click.option("--steps", type=click.IntRange(1, 1000), default=30, help="Denoising steps.")
@click.option("--guidance-scale", type=click.FloatRange(0, 100), default=None, callback=_finite, help="CFG/S-CFG scale w [default: 7.5, or the model's recommendation].")
@click.option("--pag-scale", type=click.FloatRange(0, 100), default=3.0, callback=_finite, help="PAG scale s.")
@click.option("--pag-layers", default="mid", help="Comma list of self-attention layers or patterns (see `attnguide layers`).")
@click.option("--scfg-mode", type=_LazyChoice(SCFG_MODES), default="reference", help="S-CFG arithmetic.")
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
    methods = _methods(methods)
    if mask_image is not None and init_image is None:
        raise click.BadParameter("--mask-image needs --image (the picture to inpaint)", param_hint="--mask-image")
    if seed + num_images - 1 > 2**32 - 1:
        raise click.BadParameter(f"seed + {num_images - 1} (image {num_images} of a prompt) must be <= {2**32 - 1}", param_hint="--seed")
    out_dir = Path(out)
    _writable_dir(out_dir, "--out")  # before loading or sampling anything
    from . import sampling
    from .guidance import REGISTRY
    from .pipelines import check_device, load_pipeline, recommended_settings
    from .report import image_grid

    try:
        check_device(device)
        pipe = load_pipeline(model, device=device, dtype=dtype)
    except ValueError as exc:
        if _debugging():
            raise
        raise InputError(_cli_names(_one_line(exc), _GENERATE_OPTIONS)) from None
    w = guidance_scale if guidance_scale is not None else recommended_settings(pipe)["guidance_scale"]
    stems = _file_stems(list(prompts))
    rows, labels = [], []
    for method in methods:
        try:
            result = sampling.generate(
                pipe, list(prompts), method=method, guidance_scale=w, pag_scale=pag_scale,
                pag_layers=[p for p in pag_layers.split(",") if p], num_inference_steps=steps,
                negative_prompt=negative_prompt if REGISTRY[method].uses_cfg else None, height=height, width=width,
                num_images_per_prompt=num_images, seed=seed, return_masks=masks, mask_steps=None, scfg={"mode": scfg_mode},
                image=init_image, strength=strength, mask_image=mask_image,
            )
        except (ValueError, TypeError) as exc:
            if _debugging():
                raise
            raise InputError(_cli_names(_one_line(exc), _GENERATE_OPTIONS)) from None
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
    from . import attention
    from .transformer_attention import is_transformer

    path = Path(model) if model else None
    denoiser = _load_denoiser(path)
    transformer = is_transformer(denoiser)
    recommended = _recommended_levels(path)
    levels = () if transformer else (recommended or attention.default_scfg_levels(denoiser))
    click.echo(f"{'layer':62s} {'kind':6s} {'factor':>6s} {'heads':>5s}" + ("" if transformer else "  s-cfg"))
    for layer in attention.list_layers(denoiser):
        if layer.is_cross and not show_all:
            continue
        kind = getattr(layer, "kind", "cross" if layer.is_cross else "self")
        mark = "" if transformer else ("  yes" if layer.factor in levels else "")
        click.echo(f"{layer.name:62s} {kind:6s} {layer.factor:>6d} {layer.heads:>5d}{mark}")
    if transformer:
        click.echo("default PAG layers: mid (the middle block of the main block list)")
    else:
        source = "recommended by the model's attnguide.json" if recommended else "default"
        click.echo(f"S-CFG levels (downsampling factors, {source}): {levels}; default PAG layers: mid")


def _recommended_levels(path: Path | None) -> tuple[int, ...]:
    """S-CFG levels the model folder recommends in its attnguide.json (empty if none)."""
    import json

    from .pipelines import builtin_model_path

    settings = (path or builtin_model_path()) / "attnguide.json"
    levels = json.loads(settings.read_text()).get("scfg_levels") if settings.is_file() else None
    return tuple(levels or ())


def _load_denoiser(path: Path | None):
    """The U-Net or transformer of a diffusers folder (or of a denoiser folder itself), safetensors only."""
    import json

    import diffusers

    from .pipelines import ModelLoadError, builtin_model_path, check_safetensors, load_error_reason, quiet

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

    for module, attr in (("attnguide.evaluation.evaluator_cli", "evaluator_cli"), ("attnguide.evaluation.segcheck", "segcheck"),
                         ("attnguide.evaluation.bench", "bench"), ("attnguide.evaluation.eval_cli", "eval_cli"),
                         ("attnguide.ui.app", "ui")):
        main.add_lazy_command(module, attr)  # imported on first use (keeps `attnguide --help` free of torch)


_attach_optional_commands()

if __name__ == "__main__":
    main()
