"""The sparse path (coders/sparse.py) gives the eager reference's loss and gradients."""

import dataclasses

import pytest
import torch

from monosemantic.coders import CoderConfig, build_coder
from monosemantic.coders.sparse import (DENSE_ABOVE, BatchTopKSelection, TopKSelection, _t_matmul,
                                        sparse_decode, sparse_encode)
from monosemantic.train import TrainConfig
from monosemantic.train.loop import CoderSpec, Trainer

KINDS = ("sae", "transcoder", "skip_transcoder")


@pytest.fixture(autouse=True, params=["kernels", "torch-ops"])
def sparse_ops(request, monkeypatch):
    """Every test twice: with the compiled kernels (where they build) and on PyTorch ops alone."""
    from monosemantic.coders import kernels

    if request.param == "kernels" and not kernels.enabled():
        pytest.skip("no C compiler: kernels not built")
    if request.param == "torch-ops":
        monkeypatch.setattr(kernels, "_lib", None)
        monkeypatch.setattr(kernels, "_tried", True)
    return request.param


def _coder(activation: str, kind: str, seed: int = 0):
    torch.manual_seed(seed)
    extra = {"k": 4} if activation in ("topk", "batchtopk") else {}
    cfg = CoderConfig(d_in=16, n_features=64, kind=kind, d_out=None if kind == "sae" else 12,
                      activation=activation, **extra)
    coder = build_coder(cfg)
    with torch.no_grad():  # every parameter non-trivial, so every gradient term is exercised
        coder.b_dec.normal_()
        coder.b_enc.normal_(0, 0.5)
        coder.W_dec.mul_(torch.rand(64, 1) + 0.5)
        if coder.W_skip is not None:
            coder.W_skip.normal_(0, 0.1)
        if activation == "jumprelu":
            coder.threshold.uniform_(0.1, 1.0)
    x = torch.randn(300, 16) * 2
    y = torch.randn(300, cfg.d_output)
    return coder, x, y


def _loss_and_grads(coder, fn, x, y):
    coder.zero_grad(set_to_none=True)
    out = fn(x)
    loss = (y - out).pow(2).sum(-1).mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in coder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation,mode", [("topk", "train"), ("topk", "eval"), ("batchtopk", "train"),
                                             ("batchtopk", "eval"), ("jumprelu", "eval")])
def test_sparse_path_matches_eager(activation, mode, kind):
    coder, x, y = _coder(activation, kind)
    if activation == "batchtopk":
        coder.train()
        coder(x)  # calibrate the threshold, so eval uses it
    coder.train(mode == "train")
    saved = [b.clone() for b in coder.buffers()]
    eager_loss, eager_grads = _loss_and_grads(coder, lambda v: coder(v).out, x, y)
    eager_buffers = [b.clone() for b in coder.buffers()]
    with torch.no_grad():
        eager_acts = coder(x).acts
    for b, s in zip(coder.buffers(), saved):
        b.copy_(s)
    sparse_loss, sparse_grads = _loss_and_grads(coder, lambda v: coder.forward_sparse(v).out, x, y)
    assert sparse_loss == pytest.approx(eager_loss, rel=1e-5)
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"W_skip"} if kind == "skip_transcoder" else set())
    assert expected <= set(sparse_grads)
    for name, g in eager_grads.items():
        if name == "threshold":  # jumprelu's straight-through gradient belongs to training
            continue
        assert torch.allclose(sparse_grads[name], g, atol=1e-5, rtol=1e-4), name
    for b, e in zip(coder.buffers(), eager_buffers):  # batchtopk's threshold moved the same way
        assert torch.allclose(b, e)
    for b, s in zip(coder.buffers(), saved):
        b.copy_(s)
    active = coder.forward_sparse(x).active
    assert torch.allclose(active.to_dense(64), eager_acts, atol=1e-5)
    assert active.l0() == pytest.approx(float((eager_acts > 0).sum(-1).float().mean()))
    assert torch.equal(active.fired(64), (eager_acts > 0).any(0))


def test_penalty_architectures_in_training_have_no_sparse_path():
    for activation in ("jumprelu", "relu", "gated"):
        coder, x, _ = _coder(activation, "sae")
        coder.train()
        assert not coder.has_sparse_path
        with pytest.raises(ValueError, match="no sparse path"):
            coder.forward_sparse(x)


def test_batchtopk_selection_widens_when_one_row_holds_the_batch():
    # row 0 has every feature far above the rest of the batch: its top 4k candidates are all
    # selected and its (4k+1)-th value would be too, so the selection must fall back to the full row
    torch.manual_seed(1)
    W, b = torch.randn(64, 8), torch.zeros(64)
    x = torch.randn(5, 8) * 0.01
    x[0] = W.sum(0) / W.sum(0).norm() * 50  # aligned with most features
    k = 2
    active = sparse_encode(x, W, b, BatchTopKSelection(k, 64, candidates=2))
    pre = torch.addmm(b, x, W.T).clamp_min(0).flatten()
    vals, pos = pre.topk(k * 5)
    dense = torch.zeros(5 * 64).index_put_((pos,), vals).view(5, 64)
    assert torch.allclose(active.to_dense(64), dense)
    assert int(active.offsets[1]) > 2  # row 0 kept more than its first candidates


def test_empty_rows_and_empty_batch():
    W, b = torch.randn(32, 8), torch.full((32,), -100.0)
    from monosemantic.coders.sparse import ThresholdSelection

    x = torch.randn(3, 8)
    active = sparse_encode(x, W, b, ThresholdSelection(0.0))  # nothing fires
    assert active.values.numel() == 0 and active.offsets.tolist() == [0, 0, 0, 0]
    assert torch.equal(sparse_decode(active, torch.randn(32, 5)), torch.zeros(3, 5))
    empty = sparse_encode(x[:0], W, b, TopKSelection(2))
    assert empty.n_rows == 0


@pytest.mark.parametrize("kind", ("sae", "transcoder"))
def test_sparse_auxk_matches_eager(kind):
    coder, x, y = _coder("topk", kind)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        out = coder(x)

    def aux(pre_acts):
        coder.zero_grad(set_to_none=True)
        loss = coder.auxk_loss(x, y, pre_acts, dead, 8, out=out.out)
        loss.backward()
        return float(loss.detach()), coder.W_enc.grad.clone(), coder.W_dec.grad.clone(), coder.b_enc.grad.clone()

    eager = aux(coder.encode(x).pre_acts)
    sparse = aux(None)
    assert sparse[0] == pytest.approx(eager[0], rel=1e-5)
    for e, s in zip(eager[1:], sparse[1:]):
        assert torch.allclose(s, e, atol=1e-5)
        assert s[~dead].abs().max() == 0  # only dead features learn from AuxK


@pytest.mark.parametrize("kind", ("sae", "transcoder"))
def test_sparse_auxk_scales_folded_and_no_residual(kind):
    """AuxK as the trainer calls it: the input scale on the GEMM, the target scale in the loss,
    and (normalize=False) recon + out against the target instead of a residual. Same loss and
    gradients as the eager form on copies scaled first."""
    coder, x, y = _coder("topk", kind)
    s, t = 0.37, 1.9
    dead = torch.zeros(64, dtype=torch.bool)
    dead[1::3] = True
    with torch.no_grad():
        out = coder(x * s).out

    def aux(pre_acts, *args, **kw):
        coder.zero_grad(set_to_none=True)
        loss = coder.auxk_loss(*args, pre_acts, dead, 8, out=out.clone(), normalize=False, **kw)
        loss.backward()
        return float(loss.detach()), coder.W_enc.grad.clone(), coder.W_dec.grad.clone(), coder.b_enc.grad.clone()

    eager = aux(coder.encode(x * s).pre_acts, x * s, y * t)
    folded = aux(None, x, y, scale=s, target_scale=t)
    assert folded[0] == pytest.approx(eager[0], rel=1e-5)
    for e, f in zip(eager[1:], folded[1:]):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-4)
        assert f[~dead].abs().max() == 0


@pytest.mark.parametrize("activation", ("topk", "batchtopk"))
def test_trainer_sparse_path_equals_eager(tmp_path, activation):
    torch.manual_seed(0)
    data = torch.randn(8 * 64, 16) @ torch.randn(16, 16)

    def batches(start):
        for s in range(start, 8):
            yield {"h": data[s * 64:(s + 1) * 64]}

    # a calibrated encoder: with the default tied init (W_enc = W_dec, unit rows) a token whose
    # only active feature is i leaves a residual orthogonal to row i, so b_enc[i]'s gradient is
    # exactly 0 up to rounding (seen: 2e-10), and Adam's first step turns rounding into ~lr/6
    base = TrainConfig(activation=activation, n_features=48, k=4, tokens=8 * 64, batch_size=64,
                       lr=3e-3, dead_tokens=64, checkpoint_every=100, calibrate_init=True)
    coders = {}
    for sparse in (True, False):
        cfg = dataclasses.replace(base, sparse_path=sparse)
        trainer = Trainer([CoderSpec("c", "h", cfg)], {"h": 16}, tmp_path / str(sparse))
        coders[sparse] = trainer.fit(batches, progress=False)["c"]
        assert trainer.states[0].dead.dead_mask.any()  # AuxK took part
    for (name, a), b in zip(coders[True].state_dict().items(), coders[False].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), name


@pytest.mark.parametrize("margin", [64, 1])  # 1: most rows are redone in fp32
@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("few", [0, 10**6])  # redone rows through the GEMM, or all through dots
def test_bf16_screened_topk_selects_exactly(sparse_ops, monkeypatch, margin, centred, few):
    """The bf16-precision screen keeps the exact top-k: every row's index set is the float64
    reference's, the values are fp32's, and rows it cannot decide go to the fp32 GEMM."""
    from monosemantic.coders import sparse

    if sparse_ops == "torch-ops":
        pytest.skip("the screen runs with the compiled kernels only")
    monkeypatch.setattr(sparse, "SCREEN_FEW", few)
    g = torch.Generator().manual_seed(3)
    r, n, d, k, alpha = 300, 1024, 96, 8, 0.7
    x = torch.randn(r, d, generator=g) * 2
    W = torch.randn(n, d, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    c, b0 = torch.randn(d, generator=g), torch.randn(n, generator=g) * 0.5
    bias, centre = (b0 - W @ c, (c, b0)) if centred else (b0, None)
    ref = (alpha * x.double() - (c.double() if centred else 0)) @ W.double().T + b0.double()
    redone = []
    split = TopKSelection.block_bias_split
    monkeypatch.setattr(TopKSelection, "block_bias_split",
                        lambda self, x, *a: (redone.append(len(x)), split(self, x, *a))[1])
    buffer = torch.empty(128 * n)  # 128 rows at a time: three passes
    counts, idx, vals = TopKSelection(k).block_bias_screened(
        x, W, bias, buffer, n, alpha, float(W.norm(dim=1).max()), centre, margin)
    assert counts.tolist() == [k] * r
    idx, order = idx.view(r, k).sort(dim=1)
    top = ref.topk(k, dim=1)
    want, want_order = top.indices.sort(dim=1)
    assert torch.equal(idx, want)
    torch.testing.assert_close(vals.view(r, k).gather(1, order).double(),
                               top.values.gather(1, want_order), rtol=1e-5, atol=1e-5)
    assert (sum(redone) > r // 2) == (margin == 1 and few == 0)


def test_bf16_screen_probe_refuses_an_error_beyond_the_bound(sparse_ops, monkeypatch):
    """The probe turns the screen off where the bf16 GEMM errs by more than half the bound the
    proof assumes (a bound of 0 here); the env switch overrides it either way."""
    from monosemantic.coders import sparse

    if sparse_ops == "torch-ops":
        pytest.skip("the probe is the same on either path")
    monkeypatch.setattr(sparse, "screen_error", lambda d: 0.0)
    assert sparse._screen_probe() is False
    monkeypatch.setattr(sparse, "_screen_state", {})
    monkeypatch.delenv("MONOSEMANTIC_BF16_SCREEN", raising=False)
    assert sparse.bf16_screen_usable() is False
    monkeypatch.setenv("MONOSEMANTIC_BF16_SCREEN", "1")
    assert sparse.bf16_screen_usable() is True


def test_bf16_screen_gives_a_training_step_the_same_loss_and_update(sparse_ops, tmp_path, monkeypatch):
    """One training step with the screen forced on and off: the same loss and weights after the
    step, to float rounding (later steps may part where two features tie to within rounding)."""
    if sparse_ops == "torch-ops":
        pytest.skip("the screen runs with the compiled kernels only")
    gen = torch.Generator().manual_seed(5)
    data = torch.randn(256, 96, generator=gen) @ torch.randn(96, 96, generator=gen) + 3.0
    cfg = TrainConfig(n_features=1024, k=8, tokens=256, batch_size=256, lr=1e-3, checkpoint_every=100)
    results, screened = {}, []
    screen = TopKSelection.block_bias_screened
    monkeypatch.setattr(TopKSelection, "block_bias_screened",
                        lambda self, *a: (screened.append(len(a[0])), screen(self, *a))[1])
    for on in ("1", "0"):
        monkeypatch.setenv("MONOSEMANTIC_BF16_SCREEN", on)
        trainer = Trainer([CoderSpec("c", "h", cfg)], {"h": 96}, tmp_path / on)
        coder = trainer.fit(lambda start: iter([{"h": data}][start:]), progress=False)["c"]
        results[on] = (trainer.states[0].last["loss"], coder.state_dict())
        assert sum(screened) == (256 if on == "1" else 0)  # the whole batch, when on
        screened.clear()
    assert results["1"][0] == pytest.approx(results["0"][0], rel=1e-5)
    for name, p in results["0"][1].items():
        torch.testing.assert_close(results["1"][1][name], p, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("n_features,k", [(64, 2), (64, 40), (10, 10)])
def test_weight_gradient_product_is_the_same_sparse_or_dense(n_features, k):
    """S^T @ X goes through a dense S above DENSE_ABOVE; either way it is the product."""
    gen = torch.Generator().manual_seed(0)
    vals, idx = torch.randn(30, n_features, generator=gen).topk(k, dim=1)
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    dense = torch.zeros(30, n_features).scatter(1, idx, vals)
    offsets = torch.arange(0, 30 * k + 1, k)
    rhs = torch.randn(30, 7, generator=gen)
    assert (k / n_features > DENSE_ABOVE) == (k > 6)  # both branches are taken
    torch.testing.assert_close(_t_matmul(offsets, idx.flatten(), vals.flatten(), n_features, rhs),
                               dense.T @ rhs)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_path_gives_the_input_its_gradient_too(kind):
    """The sparse path passes d x back like the eager forward (x - b_dec, or x for transcoders)."""
    coder, x, y = _coder("topk", kind)
    grads = []
    for fn in (lambda v: coder(v).out, lambda v: coder.forward_sparse(v).out):
        xg = x.clone().requires_grad_(True)
        (y - fn(xg)).pow(2).sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)
