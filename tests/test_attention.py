"""Layer selection and tap installation/restoration."""
import pytest
from conftest import tiny_unet

from attnguide import attention


@pytest.fixture(scope="module")
def unet():
    return tiny_unet().eval()


def test_list_layers_factors(unet):
    layers = {lay.name: lay for lay in attention.list_layers(unet)}
    assert layers["mid_block.attentions.0.transformer_blocks.0.attn1"].factor == 4
    assert layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1"].factor == 1
    assert layers["up_blocks.1.attentions.0.transformer_blocks.0.attn2"].factor == 2
    assert layers["up_blocks.1.attentions.0.transformer_blocks.0.attn2"].is_cross


def test_selection_patterns(unet):
    assert attention.select_self_attention(unet, "mid") == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    down1 = attention.select_self_attention(unet, "down_blocks.1")
    assert down1 == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    assert len(attention.select_self_attention(unet, ["up.*", "mid"])) == 5  # 2 per up block + mid
    assert attention.select_self_attention(unet, "*.*.0.transformer_blocks.0.attn1")  # globs per component


def test_selection_is_exact_per_component():

    # 11 down blocks would be huge; a fake name list checks the matcher directly.
    assert attention.components_match(["down_blocks", "1"], "down_blocks.1.attentions.0".split("."))
    assert not attention.components_match(["down_blocks", "1"], "down_blocks.10.attentions.0".split("."))
    assert not attention.components_match(["down_blocks", "1"], "down_blocks.11".split("."))


def test_selection_errors_list_valid_names(unet):
    with pytest.raises(ValueError, match="matches no self-attention layer.*mid_block.attentions.0"):
        attention.select_self_attention(unet, "down_blocks.7")
    with pytest.raises(ValueError, match="cross-attention"):
        attention.select_self_attention(unet, "mid_block.attentions.0.transformer_blocks.0.attn2")
    with pytest.raises(ValueError, match="at least one"):
        attention.select_self_attention(unet, [])


def test_default_scfg_levels(unet):
    assert attention.default_scfg_levels(unet) == (2, 4)  # no latent/8 here: the two coarsest


def test_taps_restore_processors_on_exception(unet):
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError):
        with attention.attention_taps(unet, perturb=attention.select_self_attention(unet, "mid")):
            assert unet.attn_processors != before
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
