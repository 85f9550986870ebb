"""Guidance rules as pure functions: no model involved."""
import math

import pytest
import torch

from attnguide.guidance import GuidanceConfig, SCFGOptions, StepPlan, combine, plan_step, rescale_guidance


def preds(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {b: torch.randn(2, 4, 8, 8, generator=g) for b in ("uncond", "cond", "perturbed")}


def test_cfg_formula():
    p = preds()
    cfg = GuidanceConfig(method="cfg", guidance_scale=6.0)
    out = combine(p, plan_step(cfg, 0, 10), cfg)
    torch.testing.assert_close(out, p["uncond"] + 6.0 * (p["cond"] - p["uncond"]))


def test_pag_and_cfg_pag_formulas():
    p = preds(1)
    pag = GuidanceConfig(method="pag", pag_scale=2.5)
    torch.testing.assert_close(combine(p, plan_step(pag, 0, 10), pag), p["cond"] + 2.5 * (p["cond"] - p["perturbed"]))
    both = GuidanceConfig(method="cfg+pag", guidance_scale=2.0, pag_scale=1.5)
    expected = p["uncond"] + 2.0 * (p["cond"] - p["uncond"]) + 1.5 * (p["cond"] - p["perturbed"])
    torch.testing.assert_close(combine(p, plan_step(both, 0, 10), both), expected)


def test_pag_term_at_scale_zero_is_cfg_even_when_computed():
    p = preds(2)
    config = GuidanceConfig(method="cfg+pag", guidance_scale=3.0, pag_scale=0.0)
    forced = StepPlan(branches=("uncond", "cond", "perturbed"), cfg=True, scfg=False, pag=True)
    cfg = GuidanceConfig(method="cfg", guidance_scale=3.0)
    torch.testing.assert_close(combine(p, forced, config), combine(p, plan_step(cfg, 0, 1), cfg))


def test_scfg_with_unit_rate_is_cfg():
    p = preds(3)
    config = GuidanceConfig(method="scfg", guidance_scale=4.0)
    plan = plan_step(config, 0, 1)
    out = combine(p, plan, config, rate=torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(out, p["uncond"] + 4.0 * (p["cond"] - p["uncond"]))


@pytest.mark.parametrize(
    "method,branches",
    [("none", ("cond",)), ("cfg", ("uncond", "cond")), ("pag", ("cond", "perturbed")),
     ("cfg+pag", ("uncond", "cond", "perturbed")), ("scfg", ("uncond", "cond")), ("scfg+pag", ("uncond", "cond", "perturbed"))],
)
def test_branches_per_method(method, branches):
    assert plan_step(GuidanceConfig(method=method), 0, 10).branches == branches


def test_windows_skip_branches():
    config = GuidanceConfig(method="cfg+pag", cfg_window=(0.0, 0.6), pag_window=(0.5, 1.0))
    plans = [plan_step(config, i, 10) for i in range(10)]
    assert [p.branches for p in plans[:5]] == [("uncond", "cond")] * 5
    assert plans[5].branches == ("uncond", "cond", "perturbed")
    assert [p.branches for p in plans[6:]] == [("cond", "perturbed")] * 4
    p = preds(4)
    # Outside the CFG window the base prediction is the conditional one.
    torch.testing.assert_close(combine(p, plans[9], config), p["cond"] + 3.0 * (p["cond"] - p["perturbed"]))


def test_noop_scales_add_no_branch():
    assert plan_step(GuidanceConfig(method="cfg", guidance_scale=1.0), 0, 1).branches == ("cond",)
    assert plan_step(GuidanceConfig(method="cfg+pag", pag_scale=0.0), 0, 1).branches == ("uncond", "cond")


def test_rescale_matches_definition():
    p = preds(5)
    guided = p["uncond"] + 7.0 * (p["cond"] - p["uncond"])
    out = rescale_guidance(guided, p["cond"], 0.7)
    std_c = p["cond"].std(dim=(1, 2, 3), keepdim=True)
    std_g = guided.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, 0.7 * guided * std_c / std_g + 0.3 * guided)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(method="cfgg"), "method"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(pag_scale=-0.5), "pag_scale"),
        (dict(pag_scale=math.inf), "pag_scale"),
        (dict(cfg_window=(0.5, 0.2)), "cfg_window"),
        (dict(pag_window=(0.0, 1.5)), "pag_window"),
        (dict(pag_window="all"), "pag_window"),
        (dict(guidance_rescale=2.0), "guidance_rescale"),
    ],
)
def test_bad_config_names_parameter(kwargs, word):
    with pytest.raises(ValueError, match=word):
        GuidanceConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,word",
    [(dict(mode="fast"), "mode"), (dict(power=0), "power"), (dict(levels=(3,)), "levels"),
     (dict(rate_min=2.0, rate_max=1.0), "rate_min"), (dict(cap=-1.0), "cap")],
)
def test_bad_scfg_options(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SCFGOptions(**kwargs)
