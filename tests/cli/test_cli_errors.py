"""Command-line errors: one line, exit code 2 for bad input and 1 for a failure, no traceback unless
--debug; model-folder errors name the file and the reason; --out is checked before sampling; file
names are unique per prompt; `attnguide --help` does not import torch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from attnguide.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from conftest import sd_components
    from diffusers import StableDiffusionPipeline

    path = tmp_path_factory.mktemp("cli") / "tiny"
    StableDiffusionPipeline(**sd_components()).save_pretrained(path, safe_serialization=True)
    return path


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _gen(model_dir: Path, out: Path, *args: str):
    method = [] if "--method" in args else ["--method", "cfg"]
    return _run("generate", "--model", str(model_dir), "--prompt", "a red circle", "--steps", "1", *method,
                "--out", str(out), *args)


def _one_clear_line(result, code: int, *words: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


@pytest.mark.parametrize(
    "args,words",
    [
        (["--guidance-scale", "nan"], ["--guidance-scale"]),
        (["--pag-scale", "nan", "--method", "pag"], ["--pag-scale"]),
        (["--height", "63"], ["--height", "multiple of"]),
        (["--width", "36"], ["--width"]),
        (["--pag-layers", "nomatch"], ["--pag-layers", "nomatch"]),
        (["--seed", str(2**40)], ["--seed"]),
        (["--seed", "-1"], ["--seed"]),
        (["--seed", str(2**32 - 1), "--n", "2"], ["--seed"]),
        (["--device", "bogus"], ["--device", "bogus"]),
        (["--method", ","], ["--method"]),
        (["--method", "cfg,magic"], ["--method", "magic"]),
        (["--mask-image", __file__], ["--mask-image"]),
        (["--scfg-levels", "0", "--method", "scfg"], ["--scfg-levels"]),
        (["--scfg-levels", "64", "--method", "scfg"], ["--scfg-levels", "available levels"]),
    ],
)
def test_generate_bad_input_is_one_line_exit_2(model_dir, tmp_path, args, words):
    result = _gen(model_dir, tmp_path / "out", *args)
    _one_clear_line(result, 2, *words)
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_refused_before_loading(model_dir, tmp_path):
    _one_clear_line(_gen(model_dir, tmp_path / "out", "--device", "cuda"), 2, "--device", "cuda")


def test_unwritable_out_is_refused_before_sampling(model_dir, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    _one_clear_line(_gen(model_dir, blocker / "sub"), 2, "--out")


def test_debug_shows_the_exception(model_dir, tmp_path):
    result = _run("--debug", "generate", "--model", str(model_dir), "--prompt", "x", "--steps", "1", "--method", "cfg",
                  "--height", "63", "--out", str(tmp_path / "o"))
    assert result.exit_code != 0 and isinstance(result.exception, ValueError) and "height" in str(result.exception)


def _broken_copy(model_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "broken"
    shutil.copytree(model_dir, path)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "breakage,words",
    [
        (lambda p: _truncate(p / "unet" / "diffusion_pytorch_model.safetensors"), ["diffusion_pytorch_model.safetensors", "truncated"]),
        (lambda p: (p / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 100),
         ["vae", "not a safetensors file"]),
        (lambda p: shutil.rmtree(p / "vae"), ["vae", "missing"]),
        (lambda p: (p / "model_index.json").write_text(json.dumps({**json.loads((p / "model_index.json").read_text()),
                                                                    "_class_name": "NoSuchPipeline"})),
         ["model_index.json", "NoSuchPipeline"]),
        (lambda p: (p / "model_index.json").write_text("{not json"), ["model_index.json", "not valid JSON"]),
        (lambda p: (p / "unet" / "config.json").write_text("{"), ["unet", "config.json", "not valid JSON"]),
        (lambda p: (p / "model_index.json").unlink(), ["model_index.json"]),
        (lambda p: (p / "text_encoder" / "model.safetensors").unlink(), ["text_encoder", "no .safetensors"]),
    ],
)
def test_bad_model_folder_names_the_file_and_the_reason(model_dir, tmp_path, breakage, words):
    path = _broken_copy(model_dir, tmp_path)
    breakage(path)
    result = _run("generate", "--model", str(path), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "o"))
    _one_clear_line(result, 2, "--model", *words)


def test_layers_with_a_broken_model_is_one_line(model_dir, tmp_path):
    path = _broken_copy(model_dir, tmp_path)
    _truncate(path / "unet" / "diffusion_pytorch_model.safetensors")
    _one_clear_line(_run("layers", str(path)), 2, "truncated")


def test_non_finite_model_output_is_a_runtime_failure(model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    nan_dir = tmp_path / "nan"
    pipe.save_pretrained(nan_dir, safe_serialization=True)
    result = _gen(nan_dir, tmp_path / "out")
    _one_clear_line(result, 1, "non-finite", "step 1")
    assert not list((tmp_path / "out").glob("*.png"))


def test_prompts_sharing_a_slug_get_distinct_files(model_dir, tmp_path):
    out = tmp_path / "out"
    long = "a red circle " * 6
    prompts = ["a red circle", "A red circle!", long + "left", long + "right", "a red circle"]
    args = [a for p in prompts for a in ("--prompt", p)]
    result = _run("generate", "--model", str(model_dir), *args, "--steps", "1", "--method", "cfg", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 5 and "wrote 5 images" in result.output


def test_help_does_not_import_torch_and_attributes_load_lazily():
    code = (
        "import sys\n"
        "from attnguide.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
        "import attnguide\n"
        "assert 'torch' not in sys.modules\n"
        "assert attnguide.pipelines.builtin_model_path().is_dir()\n"
        "assert attnguide.Limits().max_scale == 100\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    assert "Warning" not in done.stderr and "requires torchvision" not in done.stderr, done.stderr
