"""CoderConfig validation, the registry, penalties and coders.init."""

from __future__ import annotations

import pytest
import torch

from monosemantic.coders import REGISTRY, CoderConfig, build_coder, get
from monosemantic.coders.base import LP_EPS
from monosemantic.coders.init import geometric_median, initialize


@pytest.mark.parametrize("kwargs,match", [
    (dict(activation="topk", k=65), r"k=65 is larger than the width n_features=64; pick k <= n_features"),
    (dict(activation="topk"), "k is required"),
    (dict(activation="relu", k=4), "leave k=None"),
    (dict(activation="nope"), "batchtopk, gated, jumprelu, relu, topk"),
    (dict(activation="relu", d_out=7), "d_out=7 differs from d_in=8"),
    (dict(activation="relu", penalty="lp", p=1.5), r"p=1.5 is out of range"),
    (dict(activation="relu", p=0.0), r"p=0.0 is out of range"),
    (dict(activation="relu", penalty="l0"), "penalty='l0' is not available"),
    (dict(activation="topk", k=4, penalty="l1"), "penalty='l1' is not available"),
    (dict(activation="relu", kind="crosscoder"), "kind='crosscoder' is unknown"),
    (dict(activation="jumprelu", jumprelu_bandwidth=0.0), "jumprelu_bandwidth"),
])
def test_config_validation_names_field_and_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoderConfig(d_in=8, n_features=64, **kwargs)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = CoderConfig(d_in=8, n_features=64, kind="transcoder", d_out=6, activation="topk", k=4,
                      hookpoint="model.layers.0.mlp")
    assert CoderConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.d_output == 6 and CoderConfig(d_in=8, n_features=4, activation="relu").d_output == 8
    with pytest.raises(ValueError, match=r"unknown CoderConfig keys \['colour', 'size'\]"):
        CoderConfig.from_dict({**cfg.to_dict(), "size": 1, "colour": "red"})


def test_auto_penalty_resolves_per_architecture():
    resolved = {a: CoderConfig(d_in=4, n_features=8, activation=a,
                               k=2 if REGISTRY[a].uses_k else None).resolved_penalty for a in REGISTRY}
    assert resolved == {"topk": "none", "batchtopk": "none", "relu": "l1", "gated": "l1", "jumprelu": "l0"}


def test_registry_get_lists_choices():
    assert get("topk") is REGISTRY["topk"]
    with pytest.raises(ValueError, match="pick one of batchtopk, gated, jumprelu, relu, topk"):
        get("softmax")


def test_l1_penalty_weights_by_decoder_norm_and_lp_at_p1_matches():
    coder = build_coder(CoderConfig(d_in=4, n_features=3, activation="relu", penalty="lp", p=1.0))
    with torch.no_grad():
        coder.W_dec.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0, 1.0]]))
    acts = torch.tensor([[1.0, 2.0, 0.0], [0.0, 4.0, 3.0]])
    # row sums: 1*2 + 2*0.5 = 3 and 4*0.5 + 3*1 = 5 -> mean 4
    torch.testing.assert_close(coder.sparsity_penalty(acts, acts), torch.tensor(4.0))
    half = coder.sparsity_penalty(acts, acts, p=0.5)
    by_hand = sum(((m + LP_EPS) ** 0.5 - LP_EPS ** 0.5) for m in [2.0, 1.0, 2.0, 3.0]) / 2
    torch.testing.assert_close(half, torch.tensor(by_hand))
    small = torch.full((1, 3), 1e-9, requires_grad=True)
    coder.sparsity_penalty(small, small, p=0.5).backward()
    assert torch.isfinite(small.grad).all()


def test_gated_gate_learns_only_through_its_losses():
    coder = build_coder(CoderConfig(d_in=6, n_features=16, activation="gated"))
    x = torch.randn(32, 6)
    out = coder.train()(x)
    assert out.aux_loss > 0 and out.sparsity_loss > 0
    out.aux_loss.backward(retain_graph=True)
    assert coder.W_dec.grad is None  # aux decodes with a frozen copy (b_dec still centres x)
    assert coder.b_enc.grad.abs().sum() > 0
    coder.zero_grad()
    (out.out - x).pow(2).sum().backward()
    assert coder.b_enc.grad is None or (coder.b_enc.grad == 0).all()  # the gate's step has no gradient


def test_geometric_median_resists_an_outlier():
    torch.manual_seed(0)
    cluster = torch.randn(50, 3) * 0.1 + torch.tensor([1.0, 2.0, 3.0])
    pts = torch.cat([cluster, torch.tensor([[1000.0, -1000.0, 1000.0]])])
    centre = torch.tensor([1.0, 2.0, 3.0])
    assert (geometric_median(pts) - centre).norm() < 0.1
    assert (geometric_median(pts) - centre).norm() < 0.01 * (pts.mean(0) - centre).norm()


@pytest.mark.parametrize("method", ["transpose", "data", "random"])
@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_initialize_sets_unit_decoder_centre_and_scale(method, kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen) + 5.0
    y = None if kind == "sae" else torch.randn(256, 6, generator=gen) * 3 - 2.0
    cfg = CoderConfig(d_in=8, n_features=32, kind=kind, d_out=None if kind == "sae" else 6,
                      activation="topk", k=4)
    coder = build_coder(cfg)
    initialize(coder, x, y, method=method, bias="mean", seed=1)
    target = x if y is None else y
    torch.testing.assert_close(coder.b_dec, target.mean(0))
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(32))
    with torch.no_grad():
        recon = coder(x).out - coder.b_dec
        want = (target - coder.b_dec).norm(dim=1).mean()
    assert recon.norm(dim=1).mean() == pytest.approx(float(want), rel=0.05)
    if method == "transpose" and kind == "sae":
        torch.testing.assert_close(coder.W_dec, coder.W_enc / coder.W_enc.norm(dim=1, keepdim=True))
    other = build_coder(cfg)
    initialize(other, x, y, method=method, bias="mean", seed=1)
    assert torch.equal(other.W_enc, coder.W_enc)  # seeded


def test_initialize_without_calibration_leaves_unit_encoder_rows():
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0)) * 7.0
    coder = build_coder(CoderConfig(d_in=8, n_features=32, activation="topk", k=4))
    initialize(coder, x, method="transpose", seed=1, calibrate=False)
    torch.testing.assert_close(coder.W_enc, coder.W_dec)  # dictionary-learning's tied init
    torch.testing.assert_close(coder.W_enc.norm(dim=1), torch.ones(32))
    assert torch.equal(coder.b_enc, torch.zeros(32))
    calibrated = build_coder(coder.cfg)
    initialize(calibrated, x, method="transpose", seed=1)
    torch.testing.assert_close(calibrated.W_dec, coder.W_dec)  # same directions, other encoder scale
    assert not torch.allclose(calibrated.W_enc.norm(dim=1), torch.ones(32))
    kaiming = build_coder(coder.cfg)  # sparsify's scale: nn.Linear's Kaiming-uniform rows
    initialize(kaiming, x, method="transpose", seed=1, calibrate=False, encoder_norm=3 ** -0.5)
    torch.testing.assert_close(kaiming.W_enc, coder.W_enc / 3 ** 0.5)
    torch.testing.assert_close(kaiming.W_dec, coder.W_dec)


def test_initialize_needs_target_for_transcoders():
    coder = build_coder(CoderConfig(d_in=8, n_features=16, kind="transcoder", activation="relu"))
    with pytest.raises(ValueError, match="pass target="):
        initialize(coder, torch.randn(10, 8))
