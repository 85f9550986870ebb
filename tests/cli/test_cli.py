"""The command line on a tiny model saved to a local folder."""
import pytest
from click.testing import CliRunner

from attnguide.cli import main


@pytest.fixture
def model_dir(sd_pipe, tmp_path):
    path = tmp_path / "tiny"
    sd_pipe.save_pretrained(path, safe_serialization=True)
    return path


def test_generate_grid_and_masks(model_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "--model", str(model_dir), "--prompt", "a red circle", "--prompt", "a blue square",
                                       "--method", "cfg,scfg+pag", "--steps", "2", "--masks", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert "grid.png" in names
    assert "a-red-circle_scfg-pag_seed0.png" in names and "a-blue-square_cfg_seed0.png" in names
    assert "a-red-circle_scfg-pag_seed0_masks.png" in names
    assert len([n for n in names if n.endswith("_masks.png")]) == 4


def test_generate_rejects_unknown_method(model_dir, tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", str(model_dir), "--prompt", "x", "--method", "cfg,magic", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "magic" in result.output and "scfg+pag" in result.output


def test_layers_lists_self_attention(model_dir):
    result = CliRunner().invoke(main, ["layers", str(model_dir)])
    assert result.exit_code == 0, result.output
    assert "mid_block.attentions.0.transformer_blocks.0.attn1" in result.output
    assert "attn2" not in result.output
    assert "attn2" in CliRunner().invoke(main, ["layers", str(model_dir), "--all"]).output


def test_help_has_examples():
    result = CliRunner().invoke(main, ["generate", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output and "attnguide generate --prompt" in result.output


def test_every_lazy_command_resolves():
    """A renamed module must fail here, not silently drop its command from `attnguide --help`."""
    import importlib

    import click

    from attnguide.cli.app import LAZY_COMMANDS

    for module, attr in LAZY_COMMANDS:
        assert isinstance(getattr(importlib.import_module(module), attr), click.Command), (module, attr)
    names = CliRunner().invoke(main, ["--help"]).output
    for command in ("generate", "layers", "train", "eval", "bench", "segcheck", "evaluator", "ui"):
        assert f"  {command} " in names or f"  {command}\n" in names, command
