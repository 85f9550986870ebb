"""Tiny random-weight transformer pipelines (SD3, PixArt-Σ, HunyuanDiT, Sana, Flux) built from configs,
offline, with the built-in word tokenizer: the test suite's transformer models and the benchmark's
CPU-sized transformer families. Seeded: the same weights on every build."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def _tokenizer():
    from attnguide.builtin.model import build_tokenizer

    return build_tokenizer()


VOCAB = len(_tokenizer())


def _clip(with_projection: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=24, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, projection_dim=32)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    config = T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=2,
                      decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128, pad_token_id=0)
    return BertModel(config).eval()


def _gemma():
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(3)
    config = Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                          attn_implementation="eager")
    return Gemma2Model(config).eval()


def _vae(levels: int = 2, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=latent_channels,
                         norm_num_groups=4, sample_size=32, mid_block_add_attention=False,
                         shift_factor=0.0609, scaling_factor=1.5035).eval()


def _vae_dc():
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                         encoder_block_types=("ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "EfficientViTBlock"),
                         encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                         encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                         encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1],
                         downsample_block_type="conv", upsample_block_type="interpolate",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()


def sd3_transformer(num_layers: int = 3):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=num_layers, attention_head_dim=8,
                                 num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                                 pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16).eval()


def pixart_transformer():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                                    caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8,
                                    attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6).eval()


def _flow():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler()


def sd3_components() -> dict:
    tok = _tokenizer()
    return dict(transformer=sd3_transformer(), scheduler=_flow(), vae=_vae(), text_encoder=_clip(), tokenizer=tok,
                text_encoder_2=_clip(), tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)


def pixart_components() -> dict:
    return dict(transformer=pixart_transformer(), scheduler=_ddim(), vae=_vae(), text_encoder=_t5(), tokenizer=_tokenizer())


def hunyuan_components() -> dict:
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(0)
    transformer = HunyuanDiT2DModel(sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                                    in_channels=4, cross_attention_dim=32, cross_attention_dim_t5=32,
                                    pooled_projection_dim=16, hidden_size=24, activation_fn="gelu-approximate").eval()
    tok = _tokenizer()
    # HunyuanDiT's pipeline assumes an 8x VAE (its rotary grid is height // 8 // patch_size).
    return dict(transformer=transformer, scheduler=_ddim(), vae=_vae(levels=4), text_encoder=_bert(), tokenizer=tok,
                text_encoder_2=_t5(), tokenizer_2=tok, safety_checker=None, feature_extractor=None)


def sana_components() -> dict:
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=3, num_attention_heads=2,
                                         attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                         cross_attention_dim=8, caption_channels=8, sample_size=8).eval()
    return dict(transformer=transformer, scheduler=_flow(), vae=_vae_dc(), text_encoder=_gemma(), tokenizer=_tokenizer())


def flux_components() -> dict:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    tok = _tokenizer()
    return dict(transformer=transformer, scheduler=_flow(), vae=_vae(), text_encoder=_clip(with_projection=False),
                tokenizer=tok, text_encoder_2=_t5(), tokenizer_2=tok)


@dataclass(frozen=True)
class TransformerFamily:
    """A transformer pipeline family: diffusers' plain and PAG classes, the tiny components, the layer
    diffusers' PAG class needs for the same block as attnguide's ``mid``, the call's extra keyword
    arguments and the native image side."""

    name: str
    pipeline: str
    pag_pipeline: str | None
    build: Callable[[], dict]
    pag_layers: str | None = None
    call_kwargs: dict = field(default_factory=dict)
    size: int = 16


FAMILIES = {f.name: f for f in (
    TransformerFamily("sd3", "StableDiffusion3Pipeline", "StableDiffusion3PAGPipeline", sd3_components, "blocks.1",
                      {"max_sequence_length": 8}),
    TransformerFamily("pixart-sigma", "PixArtSigmaPipeline", "PixArtSigmaPAGPipeline", pixart_components, "blocks.1",
                      {"max_sequence_length": 8, "use_resolution_binning": False, "clean_caption": False}),
    TransformerFamily("hunyuan-dit", "HunyuanDiTPipeline", "HunyuanDiTPAGPipeline", hunyuan_components, "blocks.2",
                      {"use_resolution_binning": False}, size=64),
    TransformerFamily("sana", "SanaPipeline", "SanaPAGPipeline", sana_components, "transformer_blocks.1",
                      {"max_sequence_length": 8, "use_resolution_binning": False, "complex_human_instruction": None,
                       "clean_caption": False}, size=32),
    TransformerFamily("flux", "FluxPipeline", None, flux_components, None, {"max_sequence_length": 8}),
)}


def pipeline_from(class_name: str, components: dict, **extra):
    """diffusers' pipeline ``class_name`` from the components it takes (None when this diffusers
    version lacks the class), progress bar off."""
    import inspect

    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        return None
    accepted = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in components.items() if k in accepted}, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_family(name: str):
    """The plain diffusers pipeline of family ``name`` with fresh tiny components."""
    family = FAMILIES[name]
    pipe = pipeline_from(family.pipeline, family.build())
    if pipe is None:
        import diffusers

        raise ValueError(f"model tiny-{name}: diffusers {diffusers.__version__} has no {family.pipeline}")
    return pipe
