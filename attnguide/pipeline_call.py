"""What the engine reads from, and patches on, the user's pipeline during a call: the locals of its
``__call__`` that transformer pipelines keep nowhere else, the prompt's tokens for the mask legend,
the grid of Flux's packed latent tokens, and instance attributes set for the length of a block."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from . import transformer_attention as tx


def prompt_tokens(pipe, prompts: list[str] | None, images: int, tokenizer_name: str = "tokenizer") -> list[list[str]]:
    """Token strings of every image's prompt (names for the mask legend), from the tokenizer whose
    tokens the attention reads."""
    tokenizer = getattr(pipe, tokenizer_name, None) or getattr(pipe, "tokenizer", None)
    if not prompts or tokenizer is None:
        return [[] for _ in range(images)]
    length = min(int(tokenizer.model_max_length), 512)  # T5/BERT tokenizers may report a huge model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in ids]
    per_prompt = max(1, images // len(tokens))
    return [t for t in tokens for _ in range(per_prompt)][:images]


CALL_LOCALS = ("guidance_scale", "do_classifier_free_guidance", "skip_guidance_layers", "do_true_cfg", "true_cfg_scale",
                "negative_prompt_embeds", "negative_pooled_prompt_embeds", "negative_text_ids", "image_embeds",
                "negative_image_embeds")


def read_call_locals(pipe, frame) -> dict[str, Any]:
    """What a transformer pipeline keeps only in locals of its ``__call__`` (read from the frame that
    opens the progress bar, right before denoising): PixArt-Σ's CFG flag and w; Flux's true CFG (flag,
    w and the negative prompt's embeddings, which the engine batches into the conditional call); SD3's
    skip-layer guidance (a second, differently batched transformer call per step: refused)."""
    found = {k: frame.f_locals[k] for k in CALL_LOCALS if frame is not None and k in frame.f_locals}
    name = type(pipe).__name__
    if found.get("do_true_cfg"):
        if found.get("negative_prompt_embeds") is None:
            raise ValueError(f"{name} runs true CFG, but attnguide cannot find its negative prompt's embeddings "
                             "(negative_prompt_embeds) to batch with the prompt; call it with true_cfg_scale=1")
        if found.get("image_embeds") is not None or found.get("negative_image_embeds") is not None:
            raise ValueError(f"{name}: true CFG with an IP-Adapter image sets different image embeddings for the two "
                             "calls, which attnguide cannot batch; call it with true_cfg_scale=1")
    if found.get("skip_guidance_layers") is not None:
        raise ValueError(
            f"{name}'s skip_guidance_layers runs a second transformer call per step, which attnguide cannot combine "
            "with its guidance; call it with skip_guidance_layers=None"
        )
    return found


def token_grid(inputs: dict, tokens: int) -> tuple[int, int]:
    """The (h, w) grid of Flux's packed latent tokens, from their position ids (``img_ids``: row, column)."""
    ids = inputs.get("img_ids")
    if ids is None:
        raise ValueError("S-CFG on packed latent tokens needs the denoiser's img_ids (their grid positions)")
    ids = ids.reshape(-1, ids.shape[-1])[-tokens:]
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if h * w != tokens:
        raise ValueError(f"S-CFG needs the image tokens to form one grid; img_ids give {h}x{w} for {tokens} tokens "
                         "(extra reference-image tokens are not supported)")
    return h, w


def tokens_as_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) tokens in row-major grid order as a (B, C, h, w) map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


@contextlib.contextmanager
def instance_patch(obj, name: str, value) -> Iterator[None]:
    """Set ``obj.name`` on the instance for the block; afterwards the attribute is as before."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def check_pipe(pipe) -> None:
    """``pipe`` is a pipeline the engine can guide (else a ValueError saying why)."""
    model = tx.denoiser(pipe)
    if model is None:
        raise ValueError(
            f"pipe must be a diffusers U-Net or transformer pipeline (it needs a .unet or a .transformer); "
            f"{type(pipe).__name__} has neither"
        )
    if hasattr(pipe, "do_perturbed_attention_guidance") or hasattr(pipe, "set_pag_applied_layers"):
        raise ValueError(
            f"pipe is diffusers' PAG pipeline {type(pipe).__name__}, which runs its own PAG; use the plain "
            "pipeline class (e.g. StableDiffusionPipeline.from_pipe(pipe)) with attnguide.guide"
        )
    if getattr(pipe, "unet", None) is None:
        if not tx.is_transformer(model):
            raise ValueError(f"pipe.transformer ({type(model).__name__}) is not a supported diffusers transformer denoiser")
        return  # transformer pipelines: the batch layout is read per call (_Engine._pipeline_cfg)
    if not hasattr(type(pipe), "do_classifier_free_guidance"):
        raise ValueError(
            f"pipe {type(pipe).__name__} has no do_classifier_free_guidance, so the engine cannot tell which "
            "rows of its batch are unconditional"
        )


def true_cfg_batch(pipe, inputs: dict, call_locals: dict, sample_key: str, shared_inputs: frozenset) -> dict:
    """Flux's conditional call turned into an [uncond, cond] batch: the negative prompt's embeddings
    (read from the pipeline call) in the first half, every other per-row input repeated."""
    from .rows import map_rows

    batch = inputs[sample_key].shape[0]
    twice = torch.cat([torch.arange(batch)] * 2)
    doubled = {k: (map_rows(v, twice, batch, 1) if (k != "timestep" or torch.is_tensor(v)) and k not in shared_inputs else v)
               for k, v in inputs.items()}
    for key, local in (("encoder_hidden_states", "negative_prompt_embeds"), ("pooled_projections", "negative_pooled_prompt_embeds")):
        if inputs.get(key) is not None:
            doubled[key] = torch.cat([call_locals[local], inputs[key]])
    text_ids = call_locals.get("negative_text_ids")
    if text_ids is not None and inputs.get("txt_ids") is not None and not torch.equal(text_ids, inputs["txt_ids"]):
        raise ValueError(f"{type(pipe).__name__}: the negative prompt's text ids differ from the prompt's, so the "
                         "two cannot share one batch; give prompt and negative prompt the same max_sequence_length")
    return doubled


def runs_separate_cfg(pipe) -> bool:
    """Whether the pipeline's CFG is a second denoiser call with the negative prompt (Flux's
    ``true_cfg_scale``) instead of an [uncond, cond] batch."""
    import inspect

    return "true_cfg_scale" in inspect.signature(type(pipe).__call__).parameters
