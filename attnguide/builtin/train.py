"""Training of the built-in model, resumable, on CPU by default or on a GPU when present.

Three stages: the autoencoder (a few minutes); the text encoder and U-Net together on latents of
a fixed pool of rendered scenes, with condition dropout so CFG works and the empty prompt gives
unconditional samples; then the decoder alone, with the encoder frozen, so it sharpens images
without moving the latent space the U-Net has learned. A run directory holds everything needed to resume after a kill:
``state-*.safetensors`` shards (weights, EMA weights, optimiser moments, each file < 40 MB) and
``state.json``, which lists them; a checkpoint is switched atomically. The current EMA model is
exported as a diffusers folder at every checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import data
from . import model as builtin_model


@dataclass
class TrainConfig:
    out: str = "runs/builtin"
    export: str = str(builtin_model.MODEL_DIR)
    vae_steps: int = 1700
    vae_batch: int = 32
    decoder_steps: int = 0  # decoder-only fine-tuning after the diffusion stage
    steps: int = 5000
    batch: int = 64
    lr: float = 3e-4
    pool: int = 32000
    dropout: float = 0.1  # probability of training on the empty prompt
    ema: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0
    device: str = "auto"
    max_minutes: float = 0.0  # stop (after a checkpoint) once this much wall time has passed; 0 = no limit

    def __post_init__(self) -> None:
        may_be_zero = ("vae_steps", "steps", "decoder_steps")
        for name in ("vae_steps", "steps", "decoder_steps", "batch", "vae_batch", "pool", "checkpoint_every"):
            if getattr(self, name) < 0 or (name not in may_be_zero and getattr(self, name) == 0):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


SHARD_BYTES = 40 * 2**20  # training-state files stay well below the 50 MB a repository file may take


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
    """Write the state as new shard files, then switch ``state.json`` (which lists them) in one
    rename, then delete the previous shards: a kill at any point leaves a consistent state."""
    tag = time.time_ns()
    files = []
    for i, shard in enumerate(_shards(tensors)):
        name = f"state-{tag}-{i:02d}.safetensors"
        save_file(shard, str(run / name))
        files.append(name)
    tmp_json = run / "state.json.tmp"
    tmp_json.write_text(json.dumps({**meta, "files": files}, indent=1))
    os.replace(tmp_json, run / "state.json")
    for old in [*run.glob("state-*.safetensors"), run / "state.safetensors"]:
        if old.name not in files:
            old.unlink(missing_ok=True)


def _load_state(run: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and meta of a run's checkpoint (also the single-file layout of older runs)."""
    meta = json.loads((run / "state.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for name in meta.pop("files", ["state.safetensors"]):
        tensors.update(load_file(str(run / name), device=str(device)))
    return tensors, meta


def _optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in enumerate(opt.state_dict()["state"].values()):
        for key, value in state.items():
            out[f"{prefix}.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _load_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    params = [p for g in sd["param_groups"] for p in g["params"]]
    state = {}
    for i, pid in enumerate(params):
        keys = [k for k in tensors if k.startswith(f"{prefix}.{i}.")]
        if keys:
            state[pid] = {k.rsplit(".", 1)[1]: tensors[k] for k in keys}
    sd["state"] = state
    opt.load_state_dict(sd)


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _load_prefixed(prefix: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(sub)


class _Logger:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _train_vae(cfg: TrainConfig, vae, device, meta: dict, checkpoint, log: _Logger) -> None:
    """Train the autoencoder from step ``meta["vae_step"]`` to ``cfg.vae_steps`` (resumable)."""
    start = meta.get("vae_step", 0)
    rng = np.random.default_rng(cfg.seed + 1 + start)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    for step in tqdm(range(start, cfg.vae_steps), desc="autoencoder", initial=start, total=cfg.vae_steps):
        # Cosine decay over the planned steps; restarting after a kill keeps the schedule.
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (0.5 * (1 + math.cos(math.pi * step / max(cfg.vae_steps, 1))) * 0.95 + 0.05)
        batch = [data.sample_scene(rng) for _ in range(cfg.vae_batch)]
        images = torch.from_numpy(data.render_batch(batch)).to(device)
        # Decode the posterior mean: the diffusion model is trained on means, and sampling noise in
        # the latent slows this small autoencoder down a lot. A light L2 keeps the latents bounded.
        latent = vae.encode(images).latent_dist.mean
        recon = vae.decode(latent).sample
        rec = (recon - images).abs().mean() + F.mse_loss(recon, images)
        l2 = latent.pow(2).mean()
        loss = rec + 1e-4 * l2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        meta["vae_step"] = step + 1
        if step % 50 == 0:
            log.write({"stage": "vae", "step": step, "rec": rec.item(), "latent_l2": l2.item()})
        if meta["vae_step"] % 100 == 0:
            checkpoint()
    vae.eval()


def _finetune_decoder(cfg: TrainConfig, vae, device, meta: dict, checkpoint, log: _Logger, deadline: float) -> bool:
    """Train the decoder alone from ``meta["decoder_step"]`` to ``cfg.decoder_steps`` on the
    posterior means of the frozen encoder (resumable; the Adam moments restart on resume).
    Returns False if it stopped at ``deadline`` (a ``time.time()``) before finishing."""
    start = meta.get("decoder_step", 0)
    if start >= cfg.decoder_steps:
        return True
    rng = np.random.default_rng(cfg.seed + 5 + start)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    for step in tqdm(range(start, cfg.decoder_steps), desc="decoder", initial=start, total=cfg.decoder_steps):
        for group in opt.param_groups:
            group["lr"] = 5e-4 * (0.5 * (1 + math.cos(math.pi * step / cfg.decoder_steps)) * 0.9 + 0.1)
        images = torch.from_numpy(data.render_batch([data.sample_scene(rng) for _ in range(cfg.vae_batch)])).to(device)
        with torch.no_grad():
            latent = vae.encode(images).latent_dist.mean
        recon = vae.decode(latent).sample
        loss = (recon - images).abs().mean() + F.mse_loss(recon, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        meta["decoder_step"] = step + 1
        if step % 50 == 0:
            log.write({"stage": "decoder", "step": step, "rec": loss.item()})
        if time.time() > deadline:
            break
        if meta["decoder_step"] % cfg.checkpoint_every == 0:
            checkpoint()
    vae.eval().requires_grad_(False)
    checkpoint()  # also when stopped at the deadline
    return meta["decoder_step"] >= cfg.decoder_steps


@torch.no_grad()
def _encode_pool(cfg: TrainConfig, vae, device) -> tuple[torch.Tensor, list[data.Scene]]:
    pool = data.scenes(cfg.seed + 2, cfg.pool, "train")
    latents = []
    for i in tqdm(range(0, len(pool), 256), desc="encoding scenes"):
        images = torch.from_numpy(data.render_batch(pool[i : i + 256])).to(device)
        latents.append(vae.encode(images).latent_dist.mean.cpu())
    return torch.cat(latents), pool


def _export(cfg: TrainConfig, tokenizer, text_encoder, vae, unet_ema) -> None:
    """Write the EMA model as a diffusers folder (atomically: build beside, then swap)."""
    import shutil

    from diffusers import StableDiffusionPipeline

    target = Path(cfg.export)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet_ema,
        scheduler=builtin_model.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
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


def _captions(scenes_: list[data.Scene], rng: np.random.Generator, dropout: float) -> list[str]:
    """A fresh caption variant of every scene (size, relation and background words vary);
    the empty prompt with probability ``dropout``."""
    out = []
    for scene in scenes_:
        if rng.random() < dropout:
            out.append("")
        else:
            out.append(data.recaption(rng, scene).caption)
    return out


def _train_diffusion(cfg: TrainConfig, models: tuple, opt, params, latents, pool, meta: dict, checkpoint, export, log: _Logger, deadline: float) -> bool:
    """Train the text encoder and U-Net from ``meta["step"]`` to ``cfg.steps`` with EMA copies,
    checkpointing and exporting every ``cfg.checkpoint_every`` steps. Returns False if it stopped
    at ``deadline`` before finishing."""
    tokenizer, text_encoder, unet, text_ema, unet_ema = models
    device = next(unet.parameters()).device
    scheduler = builtin_model.build_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    rng = np.random.default_rng(cfg.seed + 3 + meta["step"])
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 4 + meta["step"])
    bar = tqdm(range(meta["step"], cfg.steps), desc="diffusion", initial=meta["step"], total=cfg.steps)
    unet.train()
    text_encoder.train()
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / 200) * (0.5 * (1 + math.cos(math.pi * step / max(cfg.steps, 1))) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = rng.integers(0, len(pool), size=cfg.batch)
        x0 = latents[idx].to(device)
        prompts = _captions([pool[i] for i in idx], rng, cfg.dropout)
        ids = tokenizer(prompts, padding="max_length", max_length=builtin_model.MAX_TOKENS, truncation=True, return_tensors="pt").input_ids.to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = text_encoder(ids).last_hidden_state
        pred = unet(xt, t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for ema_m, m in ((unet_ema, unet), (text_ema, text_encoder)):
                for pe, p in zip(ema_m.parameters(), m.parameters()):
                    pe.lerp_(p, 1 - decay)
        meta["step"] = step + 1
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.write({"stage": "unet", "step": step, "loss": loss.item(), "lr": lr, "time": time.time()})
        out_of_time = time.time() > deadline
        if meta["step"] % cfg.checkpoint_every == 0 or meta["step"] == cfg.steps or out_of_time:
            checkpoint()
            export()
        if out_of_time:
            return False
    return True


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
    vae = builtin_model.build_vae().to(device)
    unet = builtin_model.build_unet().to(device)
    unet_ema = builtin_model.build_unet().to(device)
    text_ema = builtin_model.build_text_encoder(len(tokenizer)).to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)

    meta = {"step": 0, "vae_step": 0}
    if (run / "state.json").exists():
        tensors, meta = _load_state(run, device)
        _load_prefixed("vae", vae, tensors)
        if meta["step"] > 0:
            for prefix, module in (("unet", unet), ("text", text_encoder), ("unet_ema", unet_ema), ("text_ema", text_ema)):
                _load_prefixed(prefix, module, tensors)
            _load_optimizer("opt", opt, tensors)
        print(f"resuming from step {meta['step']} in {run}")

    def checkpoint() -> None:
        tensors = _prefixed("vae", vae)
        if meta["step"] > 0:
            for prefix, module in (("unet", unet), ("text", text_encoder), ("unet_ema", unet_ema), ("text_ema", text_ema)):
                tensors.update(_prefixed(prefix, module))
            tensors.update(_optimizer_tensors("opt", opt))
        _atomic_save(tensors, meta, run)

    if meta.get("vae_step", 0) < cfg.vae_steps and meta["step"] == 0:
        _train_vae(cfg, vae, device, meta, checkpoint, log)
        checkpoint()
    vae.eval().requires_grad_(False)

    deadline = start_time + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    if meta["step"] < cfg.steps or "scaling_factor" not in meta:
        latents, pool = _encode_pool(cfg, vae, device)
        # Fixed once: the U-Net learns latents at this scale, whatever later stages do.
        meta.setdefault("scaling_factor", 1.0 / latents.std().item())
        log.write({"stage": "pool", "scaling_factor": meta["scaling_factor"], "pool": len(pool)})
    vae.register_to_config(scaling_factor=meta["scaling_factor"])

    if meta["step"] == 0:
        unet_ema.load_state_dict(unet.state_dict())
        text_ema.load_state_dict(text_encoder.state_dict())
    unet_ema.requires_grad_(False)
    text_ema.requires_grad_(False)

    def export() -> None:
        _export(cfg, tokenizer, text_ema, vae, unet_ema)

    finished = True
    if meta["step"] < cfg.steps:
        models = (tokenizer, text_encoder, unet, text_ema, unet_ema)
        finished = _train_diffusion(cfg, models, opt, params, latents * meta["scaling_factor"], pool, meta, checkpoint, export, log, deadline)
    if finished and meta.get("decoder_step", 0) < cfg.decoder_steps:
        finished = _finetune_decoder(cfg, vae, device, meta, checkpoint, log, deadline)
        export()
    if not finished:
        print(f"stopping after {cfg.max_minutes} minutes; run the same command again to resume")
    if meta["step"] == 0 or not (Path(cfg.export) / "model_index.json").exists():
        export()
    return Path(cfg.export)
