"""The compiled kernels of the sparse path (coders/kernels.c) against PyTorch's ops, and the sparse
path with and without them."""

import pytest
import torch

from monosemantic.coders import CoderConfig, build_coder, kernels
from monosemantic.coders.sparse import _csr

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="no C compiler: kernels not built")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _csr_parts(rows: int, n_features: int, k: int, gen: torch.Generator):
    index = torch.stack([torch.randperm(n_features, generator=gen)[:k] for _ in range(rows)]).flatten()
    offsets = torch.arange(0, rows * k + 1, k)
    return offsets, index


@pytest.mark.parametrize("n,k", [(9216, 32), (1000, 7), (130, 40), (37, 37), (50, 1), (16, 3)])
def test_topk_bias_selects_what_torch_topk_selects(threads, n, k):
    gen = torch.Generator().manual_seed(n + k)
    big = torch.randn(70, n + 5, generator=gen)
    pre = big[:, 2:n + 2]  # a row stride that is not the row length
    bias = torch.randn(n, generator=gen)
    vals, idx = kernels.topk_bias(pre, bias, k)
    ref = (pre + bias).topk(k, dim=-1)
    assert torch.equal(idx.sort(1).values, ref.indices.sort(1).values)
    assert torch.equal(vals.sort(1).values, ref.values.sort(1).values)
    assert torch.equal(vals, (pre + bias).gather(1, idx))  # each value is its own entry's


@pytest.mark.parametrize("n,k", [(200, 60), (4000, 20)])  # one scan; group maxima first
def test_topk_bias_rows_with_infinities_and_nan_give_valid_indices(threads, n, k):
    pre = torch.randn(4, n)
    pre[0] = float("-inf")  # nothing beats -inf: the scan's fallback still fills k slots
    pre[1, :n - k + 10] = float("-inf")
    pre[2, 7] = float("nan")  # NaN is never selected (torch.topk would rank it first)
    pre[3, 5] = float("inf")
    vals, idx = kernels.topk_bias(pre, torch.zeros(n), k)
    assert bool(((idx >= 0) & (idx < n)).all())
    assert all(len(set(r.tolist())) == k for r in idx)  # distinct features per row
    assert set(idx[1].tolist()) >= set(range(n - k + 10, n))  # every finite one
    assert 7 not in idx[2].tolist()
    assert 5 in idx[3].tolist() and float(vals[3].max()) == float("inf")


def test_topk_bias_refuses_bad_shapes():
    with pytest.raises(ValueError, match="k = 9 of 8"):
        kernels.topk_bias(torch.randn(2, 8), torch.zeros(8), 9)
    with pytest.raises(ValueError, match="bias"):
        kernels.topk_bias(torch.randn(2, 8), torch.zeros(7), 2)


@pytest.mark.parametrize("n_features,k", [(300, 5), (64, 40), (5000, 3)])
def test_t_matmul_and_fused_dots_match_torch(threads, n_features, k):
    gen = torch.Generator().manual_seed(k)
    rows, D = 257, 37
    offsets, index = _csr_parts(rows, n_features, k, gen)
    values = torch.randn(index.numel(), generator=gen)
    R = torch.randn(rows, D + 3, generator=gen)[:, :D]  # strided rows
    W = torch.randn(n_features, D, generator=gen)
    dense = _csr(offsets, index, values, n_features).to_dense()
    out, dots = kernels.t_matmul(offsets, index, values, n_features, R)
    assert dots is None
    torch.testing.assert_close(out, dense.T @ R, rtol=1e-5, atol=1e-5)
    out2, dots = kernels.t_matmul(offsets, index, values, n_features, R, W)
    assert torch.equal(out, out2)
    rows_of = torch.repeat_interleave(torch.arange(rows), offsets.diff())
    want = (R[rows_of] * W[index]).sum(-1)
    torch.testing.assert_close(dots, want, rtol=1e-5, atol=1e-5)
    if n_features > rows * k:  # features no entry touches get exact zero rows
        untouched = torch.ones(n_features, dtype=torch.bool)
        untouched[index] = False
        assert bool((out[untouched] == 0).all())


def test_t_matmul_is_deterministic_and_takes_empty_rows(threads):
    offsets = torch.tensor([0, 2, 2, 2, 5])  # rows 1 and 2 empty
    index = torch.tensor([3, 0, 0, 3, 1])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    R = torch.arange(12.0).reshape(4, 3)
    out, _ = kernels.t_matmul(offsets, index, values, 5, R)
    want = torch.zeros(5, 3)
    want[0] = 2 * R[0] + 3 * R[3]
    want[1] = 5 * R[3]
    want[3] = 1 * R[0] + 4 * R[3]
    assert torch.equal(out, want)
    assert torch.equal(kernels.t_matmul(offsets, index, values, 5, R)[0], out)


def test_kernels_refuse_out_of_range_csr():
    R = torch.randn(2, 4)
    with pytest.raises(IndexError, match="out of range for 3 features"):
        kernels.t_matmul(torch.tensor([0, 1, 2]), torch.tensor([0, 3]), torch.ones(2), 3, R)
    with pytest.raises(ValueError, match="do not describe 2 rows"):
        kernels.t_matmul(torch.tensor([0, 2, 1]), torch.tensor([0, 1]), torch.ones(2), 3, R)
    with pytest.raises(ValueError, match="W be"):
        kernels.t_matmul(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.ones(2), 3, R, torch.randn(3, 5))


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_sparse_path_same_with_and_without_kernels(monkeypatch, threads, kind):
    torch.manual_seed(0)
    cfg = CoderConfig(d_in=40, n_features=500, kind=kind, d_out=None if kind == "sae" else 24,
                      activation="topk", k=12)
    coder = build_coder(cfg)
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.b_enc.normal_(0, 0.5)
    x, y = torch.randn(300, 40), torch.randn(300, cfg.d_output)

    def run():
        coder.zero_grad(set_to_none=True)
        out = coder.forward_sparse(x)
        loss = (y - out.out).pow(2).sum(-1).mean()
        loss.backward()
        return out.active, float(loss.detach()), {n: p.grad.clone() for n, p in coder.named_parameters()
                                         if p.grad is not None}

    active, loss, grads = run()
    monkeypatch.setattr(kernels, "_lib", None)  # as without a compiler
    ref_active, ref_loss, ref_grads = run()
    rows = lambda a: [set(a.index[a.offsets[b]:a.offsets[b + 1]].tolist()) for b in range(a.n_rows)]
    assert rows(active) == rows(ref_active)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and {"W_enc", "W_dec", "b_enc", "b_dec"} <= grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_no_compiler_means_pytorch_ops(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("CC", "")
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    assert not kernels.enabled()
    assert not kernels.usable_for(torch.zeros(2))
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv(kernels.ENV, "0")  # turned off by the user: no compile attempted
    monkeypatch.setattr(kernels, "_compiler", lambda: pytest.fail("compiled although turned off"))
    assert not kernels.enabled()


def test_a_failing_build_warns_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tmp_path))
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: fatal error: no input files' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setattr(kernels, "_compiler", lambda: str(bad))
    with caplog.at_level("WARNING"):
        assert not kernels.enabled()
    assert "could not build" in caplog.text and "fatal error" in caplog.text
    assert not list((tmp_path / "kernels").glob("*"))  # no half-written library left behind


def test_decoder_row_steps_match_torch(threads):
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(300, 37, generator=gen) * 3
    W[5] = 0  # a zero row: left as it is by both steps
    G = torch.randn(300, 37, generator=gen)
    want_G = G - (G * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True).clamp_min(1e-30) * W
    assert kernels.project_rows(W, G)
    torch.testing.assert_close(G, want_G, rtol=1e-5, atol=1e-5)
    assert torch.equal(G[5], want_G[5])
    norm = W.norm(dim=1, keepdim=True)
    want_W = torch.where(norm > 0, W / norm, W)
    assert kernels.unit_rows(W)
    torch.testing.assert_close(W, want_W, rtol=1e-6, atol=1e-6)
    assert bool((W[5] == 0).all())
    # what the kernels cannot take is left to PyTorch (False, nothing written)
    assert not kernels.unit_rows(W.T) and not kernels.project_rows(W.double(), G.double())


def test_a_new_build_replaces_the_old_ones(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tmp_path))
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "sparse-0123456789abcdef.so").write_bytes(b"an earlier source's build")
    assert kernels.enabled()
    assert len(list((tmp_path / "kernels").glob("sparse-*.so"))) == 1
    monkeypatch.setattr(kernels, "_tried", False)  # loading again finds it and builds nothing
    monkeypatch.setattr(kernels, "_build", lambda *a: pytest.fail("rebuilt an existing build"))
    assert kernels.enabled()


@pytest.mark.parametrize("project,extra,minus", [(False, False, False), (True, True, False),
                                                 (False, True, True)])
def test_sparse_adam_is_torch_adam_on_the_sparse_gradient(threads, project, extra, minus):
    """Three steps of the fused kernel against S^T R (+ dense rows - u c^T), the decoder row
    projection, torch.optim.Adam(fused=True) and the renormalisation; the dots are <R[b], W[f]>
    with W before each step."""
    gen = torch.Generator().manual_seed(7)
    B, F, D, k = 96, 300, 40, 6
    offsets, index = _csr_parts(B, F, k, gen)
    W0 = torch.nn.functional.normalize(torch.randn(F, D, generator=gen), dim=1)
    P = torch.nn.Parameter(W0.clone())
    opt = torch.optim.Adam([P], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)
    W, m, v = W0.clone(), torch.zeros(F, D), torch.zeros(F, D)
    for step in range(1, 4):
        values, R = torch.randn(B * k, generator=gen), torch.randn(B, D, generator=gen)
        rows, rows_grad = torch.tensor([5, 0, 299]), torch.randn(3, D, generator=gen)
        u, c = torch.randn(F, generator=gen), torch.randn(D, generator=gen)
        S = _csr(offsets, index, values, F).to_dense()
        g = S.T @ R
        if extra:
            g[rows] += rows_grad
        if minus:
            g -= torch.outer(u, c)
        if project:
            w = P.detach()
            g -= (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
        dots_ref = (R @ P.detach().T).gather(1, index.view(B, k)).flatten()
        P.grad = g
        opt.step()
        if project:
            with torch.no_grad():
                P.div_(P.norm(dim=1, keepdim=True))
        dots = kernels.sparse_adam(offsets, index, values, R, W, m, v, lr=1e-2, beta1=0.9, beta2=0.999,
                                   eps=1e-8, step=step, extra_rows=rows if extra else None,
                                   extra=rows_grad if extra else None, minus=(u, c) if minus else None,
                                   project=project, unit=project, dots=True)
        torch.testing.assert_close(dots, dots_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(W, P.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m, opt.state[P]["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, opt.state[P]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_sampled_dot_and_sparse_adam_check_their_inputs(threads):
    gen = torch.Generator().manual_seed(0)
    offsets, index = _csr_parts(4, 10, 2, gen)
    R, W = torch.randn(4, 3), torch.randn(10, 3)
    torch.testing.assert_close(kernels.sampled_dot(offsets, index, R, W),
                               (R @ W.T).gather(1, index.view(4, 2)).flatten())
    with pytest.raises(ValueError, match="width"):
        kernels.sampled_dot(offsets, index, R, torch.randn(10, 4))
    m, v = torch.zeros(10, 3), torch.zeros(10, 3)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="step counts from 1"):
        kernels.sparse_adam(offsets, index, torch.ones(8), R, W, m, v, step=0, **kw)
    with pytest.raises(ValueError, match="twice"):
        kernels.sparse_adam(offsets, index, torch.ones(8), R, W, m, v, step=1, extra_rows=torch.tensor([1, 1]),
                            extra=torch.ones(2, 3), **kw)
    with pytest.raises(IndexError):
        kernels.sparse_adam(offsets, index.clamp_max(9) + 1, torch.ones(8), R, W, m, v, step=1, **kw)


@pytest.mark.parametrize("n,k,width", [(9216, 32, 4608), (1000, 7, 300), (130, 40, 40), (50, 3, 16)])
def test_topk_bias_over_feature_blocks_selects_the_whole_rows_top_k(threads, n, k, width):
    """The row's k-heap carried from block to block (`into=`) ends with the whole row's top k, as
    the encoder's feature blocks (sparse.FEATURE_BLOCK) use it; indices count from each block's
    offset."""
    from monosemantic.coders.sparse import TopKSelection

    gen = torch.Generator().manual_seed(n + k)
    x, W, b = torch.randn(70, 24, generator=gen), torch.randn(n, 24, generator=gen), torch.randn(n, generator=gen)
    counts, idx, vals = TopKSelection(k).block_bias_split(x, W, b, torch.empty(70 * width), width)
    ref = (x @ W.T + b).topk(k, dim=-1)
    assert torch.equal(counts, torch.full((70,), k))
    assert torch.equal(idx.view(70, k).sort(1).values, ref.indices.sort(1).values)
    torch.testing.assert_close(vals.view(70, k).sort(1).values, ref.values.sort(1).values)


def test_batch_stats_and_squared_error_match_torch(threads):
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(300, 41, generator=gen) * 3 + 1
    x = big[:, :40]  # rows contiguous, row stride 41
    st = kernels.batch_stats(x)
    assert st.finite
    torch.testing.assert_close(st.row_sq, x.pow(2).sum(1))
    torch.testing.assert_close(st.col_sum, x.double().sum(0))
    assert st.total_sq == pytest.approx(float(x.double().pow(2).sum()), rel=1e-6)
    assert st.variance(300, 2.0) == pytest.approx(4 * float((x.double() - x.double().mean(0)).pow(2).sum()), rel=1e-5)
    bad = x.clone()
    bad[7, 3] = float("nan")
    assert not kernels.batch_stats(bad, rows=False).finite
    pred = torch.randn(300, 40, generator=gen)
    assert kernels.squared_error(pred, x, 0.5) == pytest.approx(float((pred - 0.5 * x).double().pow(2).sum()), rel=1e-6)
    ref = 3.0 * (pred - 0.5 * x)
    assert kernels.squared_error_grad_(pred, x, 0.5, 3.0) is pred
    torch.testing.assert_close(pred, ref)
    with pytest.raises(ValueError, match="one \\[B, D\\] shape"):
        kernels.squared_error(pred[:, :39], x)
