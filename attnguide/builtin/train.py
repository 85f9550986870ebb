"""Training of the built-in model, resumable, on CPU or a GPU.

Two stages:

1. The autoencoder: a PCA of 4x4 patches of rendered scenes (``autoencoder.py``), fitted in
   seconds; a continuation (``init_from``) keeps the folder's autoencoder, so the latent space the
   U-Net learned never moves.
2. The caption encoder and U-Net together on latents of a fixed pool of rendered scenes, with
   condition dropout (CFG and the empty prompt work) and the grounding losses of ``grounding.py``
   weighted by ᾱ(t) (the attention can only know where objects are once the image shows them).
   The U-Net predicts v by default: an ε-predicting U-Net's x₀ at high noise was worse than the
   data mean, and there the layout, the object count and the background are decided.

A run folder holds everything needed to resume after a kill: ``state-*.safetensors`` shards
(weights, EMA weights, Adam moments; each file ≤ 15 MB, so it also travels through size-limited
transfers) listed by ``state.json``, which is switched atomically. The EMA model is exported as a
diffusers folder at every checkpoint, to ``OUT/model`` unless ``export`` names another folder:
training never writes into the installed package unless asked to.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import data, grounding
from . import model as builtin_model
from .autoencoder import PatchAutoencoder, fit_patch_autoencoder


@dataclass
class TrainConfig:
    out: str = "runs/builtin"
    export: str | None = None  # default: OUT/model
    init_from: str | None = None  # a diffusers folder of this model family to continue from
    steps: int = 5000
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 200
    pool: int = 32000
    dropout: float = 0.1  # probability of training on the empty prompt
    grounding: float = 0.2  # weight of each grounding term; 0 turns them off
    ema: float = 0.999
    checkpoint_every: int = 250
    autoencoder_scenes: int = 2048
    latent_channels: int = 8
    # What the U-Net predicts. v weighs the x₀ error at high noise (where the layout, the object
    # count and the background are decided) by 1 + SNR instead of ε's SNR → 0.
    prediction: str = "v_prediction"
    seed: int = 0
    device: str = "auto"
    max_minutes: float = 0.0  # stop (after a checkpoint) once this much wall time has passed; 0 = no limit

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "pool", "checkpoint_every", "autoencoder_scenes", "latent_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        for name, low, high in (("dropout", 0.0, 1.0), ("ema", 0.0, 1.0)):
            if not low <= getattr(self, name) < high:
                raise ValueError(f"{name} must be in [{low}, {high}), got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.grounding >= 0 and math.isfinite(self.grounding)):
            raise ValueError(f"grounding must be a non-negative number, got {self.grounding!r}")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0, got {self.max_minutes!r}")
        if self.prediction not in builtin_model.PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {builtin_model.PREDICTION_TYPES}, got {self.prediction!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.init_from is not None and not (Path(self.init_from) / "model_index.json").is_file():
            raise ValueError(f"init_from must be a diffusers model folder with a model_index.json, got {self.init_from!r}")
        if self.export is not None and Path(self.export).resolve() == Path(self.out).resolve():
            raise ValueError("export must not be the run folder itself")

    @property
    def export_dir(self) -> Path:
        return Path(self.export) if self.export else Path(self.out) / "model"


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# --- checkpoint files -------------------------------------------------------------------------

SHARD_BYTES = 15 * 2**20


def _shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Split the state into groups of at most ``SHARD_BYTES`` (one tensor may exceed it alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, run: Path) -> None:
    """Write new shard files, switch ``state.json`` (which lists them) with one rename, then delete
    the previous shards: a kill at any point leaves a consistent state."""
    tag = time.time_ns()
    files = []
    for i, shard in enumerate(_shards(tensors)):
        name = f"state-{tag}-{i:02d}.safetensors"
        save_file(shard, str(run / name))
        files.append(name)
    tmp_json = run / "state.json.tmp"
    tmp_json.write_text(json.dumps({**meta, "files": files}, indent=1))
    os.replace(tmp_json, run / "state.json")
    for old in run.glob("state-*.safetensors"):
        if old.name not in files:
            old.unlink(missing_ok=True)


def _load_state(run: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    meta = json.loads((run / "state.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for name in meta.pop("files"):
        tensors.update(load_file(str(run / name), device=str(device)))
    return tensors, meta


def _optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _load_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, index, name = key.rsplit(".", 2)
            state.setdefault(int(index), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _load_prefixed(prefix: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


class _Logger:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# --- models -----------------------------------------------------------------------------------

def _load_matching(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy every tensor whose name and shape match; returns the names left at initialisation."""
    own = module.state_dict()
    usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def _init_from(folder: Path, text_encoder, unet, log: _Logger) -> PatchAutoencoder | None:
    """Continue from an exported model: its text encoder and U-Net weights (tensors of another
    shape, e.g. the latent convolutions of another autoencoder, stay freshly initialised), and
    its autoencoder when it is a patch autoencoder (so the latent space stays the same)."""
    fresh_text = _load_matching(text_encoder, load_file(str(folder / "text_encoder" / "model.safetensors")))
    fresh_unet = _load_matching(unet, load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")))
    log.write({"stage": "init", "from": str(folder), "fresh_text": fresh_text, "fresh_unet": fresh_unet})
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    if vae_config.get("_class_name") != "PatchAutoencoder":
        return None
    # Built from its config and weights rather than from_pretrained, which would record the source
    # folder (``_name_or_path``) in the exported config.
    vae = PatchAutoencoder.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")})
    vae.load_state_dict(load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")))
    return vae


def _export(target: Path, tokenizer, text_encoder, vae, unet, prediction: str) -> None:
    """Write a diffusers folder (atomically: build beside, then swap) with the recommended settings."""
    from diffusers import StableDiffusionPipeline

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=builtin_model.build_scheduler(prediction), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to("cpu").save_pretrained(tmp, safe_serialization=True)
    (tmp / "attnguide.json").write_text(json.dumps(builtin_model.RECOMMENDED))
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


# --- data -------------------------------------------------------------------------------------

MAX_OBJECTS = 3


def region_masks(object_masks: list[np.ndarray], size: int) -> np.ndarray:
    """(n, 1 + MAX_OBJECTS, size, size) float32 from each scene's rendered object masks (as
    ``data.render`` returns them): the background and each object's area fraction per cell of a
    size×size grid (they sum to 1)."""
    out = np.zeros((len(object_masks), 1 + MAX_OBJECTS, size, size), dtype=np.float32)
    for i, masks in enumerate(object_masks):
        # Shapes may touch (a square's corners reach past its radius): a pixel belongs to the object
        # drawn last over it, as in the rendered image, so the regions never overlap.
        masks = masks.copy()
        for k in range(len(masks) - 2, -1, -1):
            masks[k] &= ~masks[k + 1 :].any(axis=0)
        cell = masks.shape[-1] // size
        fractions = masks.reshape(len(masks), size, cell, size, cell).mean(axis=(2, 4))
        out[i, 1 : 1 + len(masks)] = fractions
        out[i, 0] = 1.0 - fractions.sum(axis=0)
    return out


@torch.no_grad()
def _encode_pool(cfg: TrainConfig, vae, device) -> tuple[torch.Tensor, torch.Tensor, list[data.Scene]]:
    """Latents, region masks at the latent grid, and scenes of the training pool (rendered once)."""
    pool = data.scenes(cfg.seed + 2, cfg.pool, "train")
    latents, masks = [], []
    for i in tqdm(range(0, len(pool), 256), desc="rendering the scene pool"):
        rendered = [data.render(scene) for scene in pool[i : i + 256]]
        images = np.stack([image for image, _ in rendered]).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        latents.append(vae.encode_mean(torch.from_numpy(images).to(device)).cpu())
        masks.append(torch.from_numpy(region_masks([m for _, m in rendered], builtin_model.LATENT_SIZE)).half())
    return torch.cat(latents), torch.cat(masks), pool


def _captions(scenes_: list[data.Scene], rng: np.random.Generator, dropout: float) -> tuple[list[str], list]:
    """A fresh caption variant of every scene, or the empty prompt with probability ``dropout``;
    with the words naming each object (None for the empty prompt: nothing to ground)."""
    prompts, words = [], []
    for scene in scenes_:
        if rng.random() < dropout:
            prompts.append("")
            words.append(None)
        else:
            variant = data.recaption(rng, scene)
            prompts.append(variant.caption)
            words.append(variant.object_words)
    return prompts, words


def _lr(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% over the planned steps."""
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    return cfg.lr * warm * (0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps)) * 0.9 + 0.1)


# --- the diffusion stage ----------------------------------------------------------------------

class _Trainer:
    """One optimisation step of the text encoder and U-Net, with EMA copies."""

    def __init__(self, cfg: TrainConfig, tokenizer, text_encoder, unet, text_ema, unet_ema, opt, prediction: str) -> None:
        self.cfg, self.tokenizer, self.opt, self.prediction = cfg, tokenizer, opt, prediction
        self.text_encoder, self.unet, self.text_ema, self.unet_ema = text_encoder, unet, text_ema, unet_ema
        self.params = [p for m in (unet, text_encoder) for p in m.parameters()]
        self.device = next(unet.parameters()).device
        self.alphas = builtin_model.build_scheduler().alphas_cumprod.to(self.device)

    def step(self, step: int, x0, masks, prompts, words, gen) -> dict[str, float] | None:
        cfg, device = self.cfg, self.device
        for group in self.opt.param_groups:
            group["lr"] = _lr(cfg, step)
        ids = self.tokenizer(prompts, padding="max_length", max_length=builtin_model.MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, len(self.alphas), (len(x0),), generator=gen).to(device)
        a = self.alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        with autocast, (grounding.recording(self.unet) if cfg.grounding > 0 else contextlib.nullcontext({})) as store:
            cond = self.text_encoder(ids).last_hidden_state
            pred = self.unet(xt, t, cond).sample
        # v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022, eq. 9)
        target = noise if self.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = F.mse_loss(pred.float(), target)
        record = {"loss": loss.item()}
        if cfg.grounding > 0:
            regions = grounding.Regions(masks, grounding.token_regions(words, ids.shape[1]).to(device))
            terms = grounding.grounding_losses({k: v.float() for k, v in store.items()}, regions)
            weight = a.view(-1).float()  # ᾱ(t): the maps can only know the layout once the image shows it
            for name, value in terms.items():
                term = (value * weight).mean()
                loss = loss + cfg.grounding * term
                record[name] = term.item()
        if not torch.isfinite(loss):
            return None  # skip the step, keep the weights
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for ema_m, m in ((self.unet_ema, self.unet), (self.text_ema, self.text_encoder)):
                for pe, p in zip(ema_m.parameters(), m.parameters()):
                    pe.lerp_(p, 1 - decay)
        return record


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) the built-in model; returns the exported model folder."""
    start_time = time.time()
    device = _device(cfg.device)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    log = _Logger(run / "log.jsonl")
    torch.manual_seed(cfg.seed)

    tokenizer = builtin_model.build_tokenizer()
    text_encoder = builtin_model.build_text_encoder(len(tokenizer)).to(device)
    unet = builtin_model.build_unet(cfg.latent_channels).to(device)
    text_ema = builtin_model.build_text_encoder(len(tokenizer)).to(device).requires_grad_(False)
    unet_ema = builtin_model.build_unet(cfg.latent_channels).to(device).requires_grad_(False)
    opt = torch.optim.AdamW([p for m in (unet, text_encoder) for p in m.parameters()], lr=cfg.lr, weight_decay=0.01)

    meta: dict = {"step": 0}
    if (run / "state.json").exists():
        tensors, meta = _load_state(run, device)
        vae = PatchAutoencoder.from_config(json.loads(meta.pop("vae_config")))
        for prefix, module in (("vae", vae), ("unet", unet), ("text", text_encoder), ("unet_ema", unet_ema), ("text_ema", text_ema)):
            _load_prefixed(prefix, module, tensors)
        _load_optimizer("opt", opt, tensors)
        print(f"resuming from step {meta['step']} in {run}")
    else:
        vae = _init_from(Path(cfg.init_from), text_encoder, unet, log) if cfg.init_from else None
        if vae is None:
            images = data.render_batch(data.scenes(cfg.seed + 1, cfg.autoencoder_scenes, "train"))
            vae = fit_patch_autoencoder(images, cfg.latent_channels)
        unet_ema.load_state_dict(unet.state_dict())
        text_ema.load_state_dict(text_encoder.state_dict())
    vae = vae.to(device).eval()

    latents, masks, pool = _encode_pool(cfg, vae, device)
    # Fixed once: the U-Net learns latents at this scale.
    meta.setdefault("scaling_factor", vae.config.scaling_factor if cfg.init_from else 1.0 / latents.std().item())
    vae.register_to_config(scaling_factor=meta["scaling_factor"])
    latents = latents * meta["scaling_factor"]
    # Fixed at the start of a run, so a resumed run never switches what the U-Net predicts.
    meta.setdefault("prediction", cfg.prediction)
    log.write({"stage": "pool", "scaling_factor": meta["scaling_factor"], "pool": len(pool), "prediction": meta["prediction"]})

    def checkpoint() -> None:
        tensors = {}
        for prefix, module in (("vae", vae), ("unet", unet), ("text", text_encoder), ("unet_ema", unet_ema), ("text_ema", text_ema)):
            tensors.update(_prefixed(prefix, module))
        tensors.update(_optimizer_tensors("opt", opt))
        vae_config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        _atomic_save(tensors, {**meta, "vae_config": json.dumps(vae_config)}, run)
        _export(cfg.export_dir, tokenizer, text_ema, vae, unet_ema, meta["prediction"])

    trainer = _Trainer(cfg, tokenizer, text_encoder, unet, text_ema, unet_ema, opt, meta["prediction"])
    rng = np.random.default_rng(cfg.seed + 3 + meta["step"])
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 4 + meta["step"])
    deadline = start_time + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    unet.train()
    text_encoder.train()
    bar = tqdm(range(meta["step"], cfg.steps), desc="diffusion", initial=meta["step"], total=cfg.steps)
    for step in bar:
        idx = rng.integers(0, len(pool), size=cfg.batch)
        prompts, words = _captions([pool[i] for i in idx], rng, cfg.dropout)
        record = trainer.step(step, latents[idx].to(device), masks[idx].float().to(device), prompts, words, gen)
        meta["step"] = step + 1
        if record is None:
            meta["skipped"] = meta.get("skipped", 0) + 1
        elif step % 25 == 0:
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            log.write({"stage": "unet", "step": step, "lr": _lr(cfg, step), "time": time.time(), **record})
        out_of_time = time.time() > deadline
        if meta["step"] % cfg.checkpoint_every == 0 or meta["step"] == cfg.steps or out_of_time:
            checkpoint()
        if out_of_time:
            print(f"stopping after {cfg.max_minutes} minutes; run the same command again to resume")
            break
    if not (cfg.export_dir / "model_index.json").exists():
        checkpoint()
    return cfg.export_dir
