"""The shipped built-in model loads with plain diffusers and runs every method."""
import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from attnguide import generate
from attnguide.builtin.model import MODEL_DIR
from attnguide.pipelines import load_pipeline


def test_loads_with_plain_diffusers():
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle on a gray background", num_inference_steps=3, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_weights_are_small_safetensors():
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20


def test_every_method_runs_on_the_builtin_model():
    pipe = load_pipeline()
    for method in ("none", "cfg", "pag", "cfg+pag", "scfg", "scfg+pag"):
        out = generate(pipe, "a small red square to the left of a large blue circle", method=method,
                       num_inference_steps=2, seed=0, output_type="np", progress=False)
        assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
