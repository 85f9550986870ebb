"""The ``attnguide`` command group: lazy sub-commands and one-line errors.

Nothing here imports torch at start-up, so ``attnguide --help`` stays fast; commands import what
they need. The commands themselves live beside this module (``generate``, ``model``) or in the
sub-packages named in ``LAZY_COMMANDS``.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import click


class LazyNames(Sequence):
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


METHODS = LazyNames("attnguide.guidance", "METHODS")
SCFG_MODES = LazyNames("attnguide.guidance", "SCFG_MODES")


class LazyHelpOption(click.Option):
    """An option whose help text is built when help is shown (``help`` may contain ``{methods}``)."""

    def get_help_record(self, ctx):
        if self.help and "{methods}" in self.help:
            self.help = self.help.replace("{methods}", ", ".join(METHODS))
        return super().get_help_record(ctx)


class LazyChoice(click.Choice):
    """click.Choice over a ``LazyNames`` (read when the option is parsed or its help shown)."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = names
        self.case_sensitive = True

    @property
    def choices(self) -> tuple:
        return tuple(self._names)


class ScfgLevels(click.ParamType):
    """S-CFG's levels: a comma list of the U-Net's downsampling factors (``attnguide layers`` lists them)."""

    name = "FACTORS"

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if not parts or not all(p.isdigit() and int(p) >= 1 and not int(p) & (int(p) - 1) for p in parts):
            self.fail(f"a comma list of downsampling factors (powers of two, e.g. 1,2 or 4,8) expected, got {value!r}",
                      param, ctx)
        return tuple(sorted({int(p) for p in parts}))


SCFG_LEVELS = ScfgLevels()


class InputError(click.ClickException):
    """Bad input found after option parsing: one line, exit code 2."""

    exit_code = 2


class RunFailure(click.ClickException):
    """A failure while working: one line, exit code 1."""

    exit_code = 1


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def debugging() -> bool:
    """``attnguide --debug`` (or ATTNGUIDE_DEBUG=1): let exceptions through with their traceback."""
    ctx = click.get_current_context(silent=True)
    return bool((ctx is not None and ctx.find_root().params.get("debug")) or os.environ.get("ATTNGUIDE_DEBUG"))


def _as_click_error(exc: BaseException) -> click.ClickException:
    from ..validation import NonFiniteError

    hint = " (run `attnguide --debug ...` for the traceback)"
    if isinstance(exc, NonFiniteError):
        return RunFailure(one_line(exc))
    if isinstance(exc, (ValueError, TypeError, LookupError)):
        return InputError(one_line(exc))
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return RunFailure(f"out of memory: {one_line(exc)}; use fewer or smaller images (--n, --height, --width)")
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return RunFailure(f"{exc.strerror or one_line(exc)}{where}")
    return RunFailure(f"{type(exc).__name__}: {one_line(exc)}{hint}")


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
            if debugging():
                raise
            raise _as_click_error(exc) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="attnguide")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an error (also: ATTNGUIDE_DEBUG=1).")
def main(debug: bool) -> None:
    """Training-free attention guidance (CFG, PAG, S-CFG) for diffusers U-Net models."""


# Commands of the sub-packages, imported on first use (keeps `attnguide --help` free of torch);
# tests/test_cli.py checks that every entry resolves to a click command.
LAZY_COMMANDS = (
    ("attnguide.evaluation.evaluator_cli", "evaluator_cli"),
    ("attnguide.evaluation.segcheck", "segcheck"),
    ("attnguide.evaluation.bench", "bench"),
    ("attnguide.evaluation.eval_cli", "eval_cli"),
    ("attnguide.ui.app", "ui"),
)
for _module, _attr in LAZY_COMMANDS:
    main.add_lazy_command(_module, _attr)
