"""The built-in model: a small latent text-to-image diffusion model in diffusers format.

It is shaped like Stable Diffusion (word tokenizer -> CLIP text encoder -> cross-attention U-Net
with self-attention at several resolutions and a mid block -> a linear patch autoencoder with
AutoencoderKL's interface), small enough to
train and sample on a laptop CPU, and loads with plain ``StableDiffusionPipeline.from_pretrained``.
"""
from __future__ import annotations

from pathlib import Path

from . import data

MODEL_DIR = Path(__file__).resolve().parent / "model"
LATENT_SIZE = data.RESOLUTION // 4
MAX_TOKENS = 24
SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")


# Sampling settings recommended for this model; written as attnguide.json beside every export and
# read by `attnguide generate` and `attnguide eval` when no value is given.
# S-CFG level 1 is this U-Net's 16x16 attention (cells of 1/16 of the image, the finer of the two
# grids the reference reads on SD 1.5 at 512 px); adding level 2 (8x8) made its masks worse
# (segcheck) and S-CFG no better. PAG perturbs its 8x8 self-attention layers (cells of 1/8, as SD 1.5's
# mid block at 512 px); on its 4x4 mid block PAG changed nothing measurable. Both were chosen on
# prompts and scenes apart from those RESULTS.md reports (README, "The built-in model").
RECOMMENDED = {"guidance_scale": 5.0, "pag_scale": 2.0, "num_inference_steps": 30,
               "pag_layers": ["down_blocks.1", "up_blocks.1"], "scfg_levels": [1]}

def build_tokenizer():
    """A word-level fast tokenizer over the synthetic vocabulary, built offline.

    Like CLIP's, it wraps every prompt as ``<start> words... <end>`` and pads to ``MAX_TOKENS``.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in data.vocabulary():
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Same split as data.caption_words: words and runs of punctuation.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+"), behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    core.normalizer = normalizers.Lowercase()
    core.post_processor = processors.TemplateProcessing(
        single="<start> $A <end>", special_tokens=[("<start>", vocab["<start>"]), ("<end>", vocab["<end>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<start>",
        eos_token="<end>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def text_encoder_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<start>"),
        eos_token_id=SPECIAL_TOKENS.index("<end>"),
        projection_dim=128,
    )


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextModel

    return CLIPTextModel(text_encoder_config(vocab_size))


def build_unet(latent_channels: int = 8):
    """SD-shaped U-Net on 16x16 latents: attention at 16x16 and 8x8, a cross-attention mid block
    at 4x4, heads of 32 channels (small heads are slow on CPU)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=128,
        attention_head_dim=(2, 4, 4),  # diffusers' name for the number of heads
        norm_num_groups=32,
    )


PREDICTION_TYPES = ("epsilon", "v_prediction")


def build_scheduler(prediction_type: str = "epsilon"):
    """SD 1.5's noise schedule with DDIM; ``prediction_type`` is what the U-Net outputs (the noise ε,
    or v = √ᾱ·ε − √(1−ᾱ)·x₀ of Salimans & Ho 2022, eq. 9)."""
    from diffusers import DDIMScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
