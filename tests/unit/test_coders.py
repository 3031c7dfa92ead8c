"""Invariants of every registered coder architecture x kind (SAE, transcoder, skip transcoder).

Shapes: B batch, D_in = 12, D_out = 10 (transcoders), F = 32 features, K = 4.
"""

from __future__ import annotations

import copy

import pytest
import torch

from monosemantic.coders import REGISTRY, CoderConfig, SparseCoder, build_coder, load_coder

D_IN, D_OUT, F, K = 12, 10, 32, 4
KINDS = ("sae", "transcoder", "skip_transcoder")
CASES = [(a, kind) for a in sorted(REGISTRY) for kind in KINDS]


def make(activation: str, kind: str = "sae", seed: int = 0, **kw) -> SparseCoder:
    """A coder with every parameter perturbed away from its init (nonzero biases, skip, thresholds),
    so the invariants exercise all of them; batchtopk's threshold is calibrated by one batch."""
    cfg = CoderConfig(d_in=D_IN, n_features=F, kind=kind, d_out=None if kind == "sae" else D_OUT,
                      activation=activation, k=K if REGISTRY[activation].uses_k else None, **kw)
    torch.manual_seed(seed)
    coder = build_coder(cfg)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            if name == "threshold":
                p.copy_(0.05 + 0.2 * torch.rand_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))
        coder.train()
        coder(inputs(64, seed + 1))
    return coder.eval()


def inputs(b: int, seed: int) -> torch.Tensor:
    return torch.randn(b, D_IN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("activation,kind", CASES)
@pytest.mark.parametrize("training", [False, True])
def test_forward_equals_decode_of_encode(activation, kind, training):
    coder = make(activation, kind).train(training)
    x = inputs(16, 7)
    out = coder(x)
    enc = coder.encode(x)
    expected = coder.decode(enc.acts)
    if kind == "skip_transcoder":
        expected = expected + x @ coder.W_skip.T
    assert out.out.shape == (16, coder.cfg.d_output)
    torch.testing.assert_close(out.out, expected)
    torch.testing.assert_close(out.acts, enc.acts)
    assert (out.acts >= 0).all()
    assert out.sparsity_loss.shape == () and out.aux_loss.shape == ()


@pytest.mark.parametrize("activation,kind", CASES)
def test_save_load_round_trip_is_exact(activation, kind, tmp_path):
    coder = make(activation, kind)
    coder.save(tmp_path / "c")
    loaded = load_coder(tmp_path / "c").eval()
    assert type(loaded) is type(coder) and loaded.cfg == coder.cfg
    for (name, a), (_, b) in zip(coder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    if activation == "batchtopk":
        assert loaded.threshold > 0 and torch.equal(loaded.threshold, coder.threshold)
    x = inputs(8, 3)
    assert torch.equal(coder(x).out, loaded(x).out)
    assert type(SparseCoder.load(tmp_path / "c")) is type(coder)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_coder(tmp_path / "nowhere")
    make("topk").save(tmp_path / "c")
    weights = tmp_path / "c" / "coder.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"coder\.safetensors is corrupt"):
        load_coder(tmp_path / "c")
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=r"coder\.safetensors is corrupt"):
        load_coder(tmp_path / "c")
    (tmp_path / "c" / "cfg.json").write_text('{"d_in": 12,')
    with pytest.raises(ValueError, match=r"cfg\.json is corrupt"):
        load_coder(tmp_path / "c")
    (tmp_path / "c" / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"cfg\.json is missing"):
        load_coder(tmp_path / "c")


def test_load_rejects_shape_mismatch(tmp_path):
    make("relu").save(tmp_path / "a")
    build_coder(CoderConfig(d_in=D_IN, n_features=F + 1, activation="relu")).save(tmp_path / "b")
    (tmp_path / "a" / "coder.safetensors").write_bytes((tmp_path / "b" / "coder.safetensors").read_bytes())
    with pytest.raises(ValueError, match="shape"):
        load_coder(tmp_path / "a")


@pytest.mark.parametrize("kind", KINDS)
def test_topk_has_exactly_k_active_per_row(kind):
    coder = make("topk", kind)
    with torch.no_grad():
        coder.b_enc.add_(5.0)  # every pre-activation positive, so ReLU never drops a kept one
    acts = coder(inputs(32, 5)).acts
    assert ((acts > 0).sum(1) == K).all()


def test_batchtopk_eval_l0_matches_training_l0():
    coder = make("batchtopk").train()
    for step in range(200):
        coder(inputs(64, 100 + step))
    x = inputs(512, 1)
    l0_train = (coder(x).acts > 0).sum(1).float().mean()
    coder.eval()
    l0_eval = (coder(x).acts > 0).sum(1).float().mean()
    assert l0_train == pytest.approx(K, rel=0.01)
    assert abs(l0_eval - l0_train) <= 0.1 * l0_train


def test_jumprelu_threshold_gets_gradient_from_l0_and_reconstruction():
    coder = make("jumprelu", jumprelu_bandwidth=0.5).train()
    x = inputs(256, 2)
    out = coder(x)
    (grad_l0,) = torch.autograd.grad(out.sparsity_loss, coder.threshold, retain_graph=True)
    (grad_rec,) = torch.autograd.grad((out.out - x).pow(2).sum(-1).mean(), coder.threshold)
    assert grad_l0.abs().sum() > 0 and grad_rec.abs().sum() > 0
    assert (grad_l0 <= 0).all()  # raising a threshold can only lower L0


@pytest.mark.parametrize("activation,kind", CASES)
def test_fold_scale_is_exact(activation, kind):
    s_in, s_out = (2.5, 2.5) if kind == "sae" else (3.7, 0.45)
    norm = make(activation, kind)
    if activation in ("topk", "batchtopk"):
        norm.set_decoder_to_unit_norm()  # per-feature scales would change their selection
    raw = copy.deepcopy(norm)
    raw.fold_scale(s_in, s_out)
    x = 1.3 * inputs(64, 9)
    with torch.no_grad():
        torch.testing.assert_close(raw(x).out, norm(x * s_in).out / s_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(raw(x).acts * s_out, norm(x * s_in).acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw.W_dec, norm.W_dec)


def test_fold_scale_rejects_sae_with_different_scales():
    with pytest.raises(ValueError, match="must equal out_scale"):
        make("relu").fold_scale(2.0, 3.0)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "gated"])
def test_fold_decoder_norms_keeps_outputs(activation):
    coder = make(activation, "skip_transcoder")
    with torch.no_grad():
        coder.W_dec.mul_(torch.rand(F, 1) + 0.5)
    before = coder(inputs(32, 4)).out
    coder.fold_decoder_norms()
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(F))
    torch.testing.assert_close(coder(inputs(32, 4)).out, before, rtol=1e-5, atol=1e-5)


def test_fold_decoder_norms_refuses_per_feature_scales_for_topk():
    coder = make("topk")
    with torch.no_grad():
        coder.W_dec.mul_(torch.rand(F, 1) + 0.5)
    with pytest.raises(ValueError, match="per-feature"):
        coder.fold_decoder_norms()


@pytest.mark.parametrize("activation,kind", CASES)
def test_decoder_normalisation_and_gradient_projection(activation, kind):
    coder = make(activation, kind)
    coder.set_decoder_to_unit_norm()
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(F))
    x = inputs(16, 6)
    coder.train()(x).out.pow(2).sum().backward()
    coder.remove_gradient_parallel_to_decoder()
    assert coder.W_dec.grad.abs().sum() > 0
    g = coder.W_dec.grad
    assert ((g * coder.W_dec).sum(1).abs() <= 1e-5 * g.norm(dim=1).clamp_min(1e-6)).all()


def test_gradient_projection_over_several_row_blocks():
    # the projection runs in blocks of 1,024 rows: rows in every block, including a short last
    # one, lose exactly their component along their (not unit) decoder row
    cfg = CoderConfig(d_in=D_IN, n_features=2500, activation="topk", k=K)
    coder = build_coder(cfg)
    g = torch.randn(2500, D_IN)
    coder.W_dec.grad = g.clone()
    with torch.no_grad():
        coder.W_dec.mul_(torch.rand(2500, 1) + 0.5)
    w = coder.W_dec.detach()
    coder.remove_gradient_parallel_to_decoder()
    expected = g - ((g * w).sum(1) / (w * w).sum(1))[:, None] * w
    torch.testing.assert_close(coder.W_dec.grad, expected, rtol=1e-5, atol=1e-5)


def test_auxk_loss_trains_only_dead_features():
    coder = make("topk", "transcoder")
    x, y = inputs(32, 1), torch.randn(32, D_OUT)
    pre = coder.encode(x).pre_acts.detach().requires_grad_(True)
    out = coder(x).out.detach().requires_grad_(True)
    target = y.clone().requires_grad_(True)
    none_dead = torch.zeros(F, dtype=torch.bool)
    assert coder.auxk_loss(x, target, pre, none_dead, k_aux=8, out=out) == 0
    dead = torch.zeros(F, dtype=torch.bool)
    dead[:10] = True
    loss = coder.auxk_loss(x, target, pre, dead, k_aux=4, out=out)
    assert loss > 0
    loss.backward()
    assert pre.grad[:, :10].abs().sum() > 0 and (pre.grad[:, 10:] == 0).all()
    assert (coder.W_dec.grad[10:] == 0).all() and coder.W_dec.grad[:10].abs().sum() > 0
    assert out.grad is None and target.grad is None  # the residual is detached
    assert coder.b_dec.grad is None  # decoded without b_dec
    recomputed = coder.auxk_loss(x, y, pre, dead, k_aux=4)  # out recomputed when not given
    torch.testing.assert_close(recomputed, loss.detach())
