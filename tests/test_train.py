"""Training of the built-in model: a few steps of every stage, resume, and what each stage may change."""
import json
from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from attnguide.builtin.train import SHARD_BYTES, TrainConfig, _load_state, train


def _state(run):
    files = json.loads((run / "state.json").read_text())["files"]
    assert sorted(p.name for p in run.glob("*.safetensors")) == sorted(files)  # old shards removed
    assert all((run / f).stat().st_size < SHARD_BYTES + 2**20 for f in files)
    return _load_state(run, torch.device("cpu"))


def _part(tensors, prefix):
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_resume_and_decoder_stage(tmp_path):
    run, model = tmp_path / "run", tmp_path / "model"
    cfg = TrainConfig(out=str(run), export=str(model), vae_steps=2, vae_batch=2, steps=2, batch=2, pool=8,
                      checkpoint_every=1, device="cpu")
    train(cfg)
    first, meta = _state(run)
    assert (meta["vae_step"], meta["step"], meta.get("decoder_step", 0)) == (2, 2, 0)
    pipe = StableDiffusionPipeline.from_pretrained(model, use_safetensors=True, local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(meta["scaling_factor"])
    assert json.loads((model / "attnguide.json").read_text())["guidance_scale"] > 1

    # Resume with one more diffusion step, then the decoder stage: the encoder never changes.
    train(replace(cfg, steps=3, decoder_steps=2))
    second, meta = _state(run)
    assert (meta["step"], meta["decoder_step"]) == (3, 2)
    assert _equal(_part(first, "vae.encoder."), _part(second, "vae.encoder."))
    assert not _equal(_part(first, "vae.decoder."), _part(second, "vae.decoder."))
    assert not _equal(_part(first, "unet."), _part(second, "unet."))

    # The decoder stage alone leaves the U-Net, text encoder and encoder untouched.
    train(replace(cfg, steps=3, decoder_steps=3))
    third, meta = _state(run)
    assert meta["decoder_step"] == 3
    for prefix in ("unet.", "unet_ema.", "text.", "text_ema.", "vae.encoder.", "vae.quant_conv."):
        assert _equal(_part(second, prefix), _part(third, prefix)), prefix
    assert not _equal(_part(second, "vae.decoder."), _part(third, "vae.decoder."))
    exported = load_file(str(model / "vae" / "diffusion_pytorch_model.safetensors"))
    torch.testing.assert_close(exported["decoder.conv_out.weight"], third["vae.decoder.conv_out.weight"])


def test_bad_config_names_the_parameter():
    with pytest.raises(ValueError, match="decoder_steps"):
        TrainConfig(decoder_steps=-1)
    with pytest.raises(ValueError, match="batch"):
        TrainConfig(batch=0)
