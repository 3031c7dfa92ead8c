"""Coders on attention (models.attention_site, evaluate/attention.py) on tiny Llama and GPT-2."""

from __future__ import annotations

import pytest
import torch

from conftest import LAYER, make_lm
from monosemantic.coders import CoderConfig, build_coder
from monosemantic.evaluate.attention import attention_written, head_report
from monosemantic.hooks import capture
from monosemantic.models import attention_site, projection_matrix

OUT_PROJ = {"llama": "model.layers.{}.self_attn.o_proj", "gpt2": "transformer.h.{}.attn.c_proj"}


def test_attention_site_is_found_by_module_name(family):
    lm = make_lm(family)
    site = attention_site(lm.model, 1)
    assert site.out_proj == OUT_PROJ[family].format(1)
    assert (site.n_heads, site.head_dim) == (4, 8)
    assert attention_site(lm.model, LAYER[family].format(1) + ".mlp") == site
    # the heads hookpoint holds the concatenated heads: projecting it gives the block's output
    ids = torch.randint(4, 99, (2, 7))
    with capture(lm.model, [site.heads_hookpoint, site.output_hookpoint]) as acts:
        lm.model(input_ids=ids)
    heads = acts[site.heads_hookpoint]
    assert heads.shape[-1] == site.n_heads * site.head_dim
    W_o = projection_matrix(lm.model.get_submodule(site.out_proj))
    bias = getattr(lm.model.get_submodule(site.out_proj), "bias", None)
    expect = heads @ W_o.T + (0 if bias is None else bias)
    torch.testing.assert_close(acts[site.output_hookpoint], expect, atol=1e-5, rtol=1e-5)


def _coder(site, written: str, d_model: int):
    hp = site.heads_hookpoint if written == "heads" else site.output_hookpoint
    width = site.n_heads * site.head_dim if written == "heads" else d_model
    return build_coder(CoderConfig(d_in=width, n_features=12, activation="topk", k=2, hookpoint=hp))


@pytest.mark.parametrize("written", ["heads", "output"])
def test_a_feature_writing_through_one_head_is_attributed_to_it(family, written):
    lm = make_lm(family)
    site = attention_site(lm.model, 2)
    coder = _coder(site, written, 32)
    W_o = projection_matrix(lm.model.get_submodule(site.out_proj))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(site.n_heads):  # feature i writes through head i alone
            v = torch.zeros(site.n_heads * site.head_dim)
            v[i * site.head_dim:(i + 1) * site.head_dim] = torch.randn(site.head_dim, generator=g)
            coder.W_dec[i] = v if written == "heads" else W_o @ v
    assert attention_written(coder, lm.model) == (site, written)
    density = torch.linspace(1, 0, 12)  # features 0..3 are the most frequent
    report = head_report(coder, lm.model, density, top=4)
    for i in range(site.n_heads):
        assert float(report.shares[i, i]) == pytest.approx(1.0, abs=1e-5)
    assert [r["head"] for r in report.top] == [0, 1, 2, 3]
    torch.testing.assert_close(report.shares.sum(1), torch.ones(12))
    # a feature spread evenly over two heads gets half each
    with torch.no_grad():
        v = torch.zeros(site.n_heads * site.head_dim)
        v[:site.head_dim] = 1.0
        v[site.head_dim:2 * site.head_dim] = 1.0
        if written == "output":  # equal writes after the projection
            a = W_o[:, :site.head_dim] @ torch.ones(site.head_dim)
            b = W_o[:, site.head_dim:2 * site.head_dim] @ torch.ones(site.head_dim)
            v[site.head_dim:2 * site.head_dim] *= float(a.norm() / b.norm())
        coder.W_dec[5] = v if written == "heads" else W_o @ v
    shares = head_report(coder, lm.model, density).shares[5]
    assert float(shares[0]) == pytest.approx(0.5, abs=1e-4) and float(shares[1]) == pytest.approx(0.5, abs=1e-4)


def test_coders_elsewhere_get_no_head_report(family):
    lm = make_lm(family)
    coder = build_coder(CoderConfig(d_in=32, n_features=8, activation="topk", k=2,
                                    hookpoint=LAYER[family].format(1)))
    assert head_report(coder, lm.model) is None
