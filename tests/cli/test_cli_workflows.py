"""`attnguide generate --image` (img2img) and `--mask-image` (inpainting) equal diffusers' own pipelines."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image, ImageDraw

from attnguide.cli import main


@pytest.fixture
def model_dir(sd_pipe, tmp_path):
    path = tmp_path / "tiny"
    sd_pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def pictures(tmp_path):
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    ImageDraw.Draw(image).ellipse([4, 4, 20, 20], fill=(220, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle([16, 16, 31, 31], fill=255)
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    return tmp_path / "in.png", tmp_path / "mask.png"


def _cli_image(model_dir, out, *extra):
    result = CliRunner().invoke(main, ["generate", "--model", str(model_dir), "--prompt", "a blue square", "--method", "cfg",
                                       "--steps", "4", "--guidance-scale", "5", "--seed", "3", "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    (png,) = [p for p in out.glob("*.png") if not p.name.endswith("_masks.png")]
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.float64) / 255


def _reference(pipe_class, model_dir, **kwargs):
    pipe = pipe_class.from_pretrained(model_dir, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a blue square", num_inference_steps=4, guidance_scale=5.0, generator=[torch.Generator().manual_seed(3)],
               output_type="np", **kwargs).images[0]
    return np.round(out * 255) / 255  # as the PNG stores it


def test_img2img_equals_diffusers(model_dir, pictures, tmp_path):
    image, _ = pictures
    ours = _cli_image(model_dir, tmp_path / "out", "--image", str(image), "--strength", "0.6")
    ref = _reference(StableDiffusionImg2ImgPipeline, model_dir, image=Image.open(image).convert("RGB"), strength=0.6)
    assert np.abs(ours - ref).max() <= 1 / 255 + 1e-9
    plain = _cli_image(model_dir, tmp_path / "plain")
    assert np.abs(ours - plain).max() > 0.02  # the input image matters


def test_inpainting_equals_diffusers(model_dir, pictures, tmp_path):
    image, mask = pictures
    ours = _cli_image(model_dir, tmp_path / "out", "--image", str(image), "--mask-image", str(mask), "--strength", "0.6")
    ref = _reference(StableDiffusionInpaintPipeline, model_dir, image=Image.open(image).convert("RGB"),
                     mask_image=Image.open(mask), strength=0.6, height=32, width=32)
    assert np.abs(ours - ref).max() <= 1 / 255 + 1e-9


def test_mask_image_needs_image(model_dir, pictures, tmp_path):
    _, mask = pictures
    result = CliRunner().invoke(main, ["generate", "--model", str(model_dir), "--prompt", "x", "--mask-image", str(mask),
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--mask-image" in result.output
