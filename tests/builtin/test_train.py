"""Training of the built-in model: the patch autoencoder, grounding losses, resume, export, init."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from attnguide.builtin import data, grounding
from attnguide.builtin.autoencoder import PatchAutoencoder, fit_patch_autoencoder
from attnguide.builtin.model import MODEL_DIR
from attnguide.builtin.train import SHARD_BYTES, TrainConfig, _load_state, region_masks, train


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4.0 / (a - b).pow(2).mean()))  # images in [-1, 1]: peak-to-peak 2


def test_patch_autoencoder_round_trip_on_rendered_scenes():
    fit = data.render_batch(data.scenes(11, 256))
    ae = fit_patch_autoencoder(fit, latent_channels=8)
    held = torch.from_numpy(data.render_batch(data.scenes(12, 64, "heldout")))
    z = ae.encode(held).latent_dist.sample()
    assert z.shape == (64, 8, 16, 16)
    # Whitened: every channel has about unit variance on held-out scenes.
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(8), atol=0.35)
    assert _psnr(ae.decode(z).sample, held) > 28.0
    # The latent distribution has (practically) zero variance: sampling returns the mean.
    dist = ae.encode(held).latent_dist
    torch.testing.assert_close(dist.sample(generator=torch.Generator().manual_seed(0)), dist.mean, atol=1e-5, rtol=0)
    # Decoding then encoding a latent gives it back (the decoder is the encoder's right inverse).
    torch.testing.assert_close(ae.encode_mean(ae.decode(z).sample), z, atol=1e-4, rtol=0)
    # All 8·16·16 = 2048 values of a 64x64x3 image: far more than a 4-channel code keeps.
    ae4 = fit_patch_autoencoder(fit, latent_channels=4)
    assert _psnr(ae.decode(z).sample, held) > _psnr(ae4.decode(ae4.encode_mean(held)).sample, held) + 1.0


def test_patch_autoencoder_saves_and_loads(tmp_path):
    ae = fit_patch_autoencoder(data.render_batch(data.scenes(1, 32)), latent_channels=8)
    ae.register_to_config(scaling_factor=0.7)
    ae.save_pretrained(tmp_path, safe_serialization=True)
    loaded = PatchAutoencoder.from_pretrained(tmp_path, use_safetensors=True)
    x = torch.from_numpy(data.render_batch(data.scenes(2, 4)))
    torch.testing.assert_close(loaded.encode_mean(x), ae.encode_mean(x))
    assert loaded.config.scaling_factor == 0.7
    assert not list(tmp_path.glob("*.bin"))


def test_shipped_model_loads_with_plain_from_pretrained_after_import():
    """In a fresh interpreter: ``import attnguide`` then diffusers' own loader, nothing else."""
    code = (
        "import attnguide, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({str(MODEL_DIR)!r}, use_safetensors=True, local_files_only=True)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = pipe('a red circle', num_inference_steps=2, guidance_scale=5.0, output_type='np',"
        " generator=torch.Generator().manual_seed(0)).images\n"
        "assert out.shape == (1, 64, 64, 3), out.shape\n"
        "print(type(pipe.vae).__name__)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "PatchAutoencoder"  # the shipped v2 autoencoder


def test_region_masks_sum_to_one_and_match_the_objects():
    scene = data.scenes(3, 1, n_objects=2)[0]
    _, full = data.render(scene)
    masks = region_masks([full], 16)[0]
    np.testing.assert_allclose(masks.sum(axis=0), 1.0, atol=1e-6)
    np.testing.assert_allclose(masks[1:3].sum(axis=(1, 2)) * 16, full.sum(axis=(1, 2)), rtol=1e-6)  # 4x4 pixels a cell
    assert masks[3].sum() == 0  # no third object


def _regions(batch_masks: torch.Tensor, words) -> grounding.Regions:
    return grounding.Regions(batch_masks, grounding.token_regions(words, 6))


def test_token_regions():
    regions = grounding.token_regions([((1, 2), (5,)), None], 8)
    assert regions[0].tolist() == [-1, 0, 1, 1, 0, 0, 2, 0]  # <start> free, words shifted by one
    assert regions[1].tolist() == [-1] * 8  # empty prompt: nothing to ground


def test_grounding_losses_are_zero_for_perfect_maps_and_known_for_uniform_ones():
    # A 2x2 grid: pixel 0 is the object, pixels 1-3 background. Tokens: <start>, word (object), 4 others.
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 1, 0, 0] = 1.0
    masks[0, 0] = 1.0 - masks[0, 1]
    regions = _regions(masks, [((0,),)])
    perfect = torch.zeros(1, 4, 6)
    perfect[0, 0, 1] = 1.0  # the object pixel attends only to its word
    perfect[0, 1:, 2:] = 0.25  # background pixels spread over the background tokens
    self_perfect = torch.eye(4)[None]
    terms = grounding.layer_losses(perfect, self_perfect, regions)
    for name, value in terms.items():
        assert value.item() == pytest.approx(0.0, abs=1e-5), name
    uniform = torch.full((1, 4, 6), 1 / 6)
    terms = grounding.layer_losses(uniform, torch.full((1, 4, 4), 0.25), regions)
    # token term: the word keeps 1/4 of its mass inside, each background token 3/4 -> mean of (3/4, 1/4 x4)
    assert terms["token"].item() == pytest.approx((0.75 + 4 * 0.25) / 5, rel=1e-5)
    # self term: the object pixel keeps 1/4 of its self-attention in its region, background pixels 3/4
    assert terms["self"].item() == pytest.approx((0.75 + 3 * 0.25) / 4, rel=1e-5)
    # pixel term: BCE of the region sums (object 1/6, background 4/6) against the masks
    bce = torch.nn.functional.binary_cross_entropy
    obj = bce(torch.full((4,), 1 / 6), masks[0, 1].flatten())
    bg = bce(torch.full((4,), 4 / 6), masks[0, 0].flatten())
    assert terms["pixel"].item() == pytest.approx(((obj + bg) / 2).item(), rel=1e-4)


def test_recording_restores_the_processors():
    from attnguide.builtin.model import build_unet

    unet = build_unet(8)
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError):
        with grounding.recording(unet) as store:
            unet(torch.zeros(1, 8, 16, 16), 10, torch.zeros(1, 24, 128))
            assert any(k.endswith("attn2") for k in store)
            raise RuntimeError("stop")
    assert all(unet.attn_processors[k] is v for k, v in before.items())


def _state(run):
    files = json.loads((run / "state.json").read_text())["files"]
    assert sorted(p.name for p in run.glob("*.safetensors")) == sorted(files)  # old shards removed
    assert all((run / f).stat().st_size <= SHARD_BYTES + 2**20 for f in files)
    return _load_state(run, torch.device("cpu"))


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_train_resume_init_from_and_never_the_package_folder(tmp_path):
    package = _mtimes(MODEL_DIR)
    run = tmp_path / "run"
    cfg = TrainConfig(out=str(run), steps=2, batch=2, pool=8, checkpoint_every=1, autoencoder_scenes=16, device="cpu", warmup=1)
    assert train(cfg) == run / "model"  # default export: inside the run folder
    first, meta = _state(run)
    assert meta["step"] == 2 and (run / "model" / "model_index.json").is_file()
    recommended = json.loads((run / "model" / "attnguide.json").read_text())
    assert recommended["guidance_scale"] > 1 and recommended["scfg_levels"]
    index = json.loads((run / "model" / "model_index.json").read_text())
    assert index["vae"][1] == "PatchAutoencoder"
    scheduler = json.loads((run / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == meta["prediction"] == "v_prediction"  # the default
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"token", "pixel", "self"} <= set(next(r for r in log if r.get("stage") == "unet"))

    # Resume: one more step continues from the checkpoint (the autoencoder and what the U-Net
    # predicts stay those the run started with).
    train(replace(cfg, steps=3, prediction="epsilon"))
    second, meta = _state(run)
    assert meta["step"] == 3 and meta["prediction"] == "v_prediction"
    assert torch.equal(first["vae.components"], second["vae.components"])
    assert not torch.equal(first["unet.conv_in.weight"], second["unet.conv_in.weight"])

    # Continue an exported model in a new run: its autoencoder and weights are taken over.
    more = tmp_path / "more"
    train(replace(cfg, out=str(more), init_from=str(run / "model"), steps=1))
    third, _ = _state(more)
    assert torch.equal(third["vae.components"], second["vae.components"])
    # The continuation's export does not record where its autoencoder came from.
    source_vae = json.loads((run / "model" / "vae" / "config.json").read_text())
    assert json.loads((more / "model" / "vae" / "config.json").read_text()) == source_vae
    assert "_name_or_path" not in source_vae
    assert _mtimes(MODEL_DIR) == package  # the installed model was never written


def test_bad_config_names_the_parameter(tmp_path):
    for kwargs, word in (({"batch": 0}, "batch"), ({"grounding": -1.0}, "grounding"), ({"steps": 0}, "steps"),
                         ({"init_from": str(tmp_path)}, "init_from"), ({"dropout": 1.0}, "dropout"),
                         ({"prediction": "sample"}, "prediction")):
        with pytest.raises(ValueError, match=word):
            TrainConfig(**kwargs)


def test_gpu_training_script_dry_run(tmp_path):
    """The one-call GPU script, run on the CPU with a handful of steps: its parts reassemble into a model."""
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    # The script calls `python` and `attnguide`: those of the interpreter running the tests.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "OMP_NUM_THREADS": "1", "PATH": path}
    done = subprocess.run(["bash", str(root / "scripts" / "train_gpu.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    parts = sorted(out.glob("model.tar.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    joined = tmp_path / "model.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        tar.extractall(tmp_path / "back", filter="data")
    assert (tmp_path / "back" / "model" / "model_index.json").is_file()
    assert (out / "log.jsonl").stat().st_size > 0


def test_region_masks_resolve_touching_objects():
    """Two objects whose masks overlap: the pixel goes to the one drawn last, and the background stays >= 0."""
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[0, :8, :8] = True
    masks[1, 4:12, 4:12] = True
    regions = region_masks([masks], 16)[0]
    assert regions.min() >= 0 and np.allclose(regions.sum(axis=0), 1.0)
    assert regions[1, 1, 1] == 0.0 and regions[2, 1, 1] == 1.0  # cell (4..7, 4..7) is under the second object
