"""Pursuit inference over a decoder (coders/pursuit.py): planted sparse codes are recovered."""

from __future__ import annotations

import pytest
import torch

from monosemantic.coders import CoderConfig, build_coder
from monosemantic.coders.pursuit import PursuitCoder, gradient_pursuit, matching_pursuit, with_inference


def _planted(d: int, f: int, k: int, n: int, seed: int = 0, orthonormal: bool = False):
    g = torch.Generator().manual_seed(seed)
    if orthonormal:
        W = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T.float()
    else:
        W = torch.randn(f, d, generator=g)
        W = W / W.norm(dim=1, keepdim=True) * (0.5 + torch.rand(f, 1, generator=g))  # not unit
    f = W.shape[0]
    code = torch.zeros(n, f)
    for i in range(n):
        idx = torch.randperm(f, generator=g)[:k]
        code[i, idx] = 1 + torch.rand(k, generator=g)
    b = torch.randn(d, generator=g) * 0.1
    return W, b, code, code @ W + b


def test_gradient_pursuit_recovers_a_planted_code_exactly():
    W, b, code, x = _planted(d=128, f=256, k=4, n=64)
    res = gradient_pursuit(x, W, b, l0=4)
    assert torch.equal(res.acts > 0, code > 0)  # the support, exactly
    torch.testing.assert_close(res.acts, code, atol=1e-4, rtol=0)
    torch.testing.assert_close(res.out, x, atol=1e-4, rtol=0)


def test_matching_pursuit_recovers_a_planted_code_on_an_orthonormal_dictionary():
    W, b, code, x = _planted(d=64, f=64, k=5, n=32, orthonormal=True)
    res = matching_pursuit(x, W, b, l0=5)
    assert torch.equal(res.acts > 1e-6, code > 0)
    torch.testing.assert_close(res.acts, code, atol=1e-5, rtol=0)


def test_matching_pursuit_reduces_the_error_with_each_selection():
    W, b, code, x = _planted(d=64, f=256, k=8, n=32)
    errs = [float((matching_pursuit(x, W, b, l0=n).out - x).pow(2).sum()) for n in (1, 4, 16)]
    assert errs[0] > errs[1] > errs[2]


def test_pursuit_coder_speaks_the_coder_interface_and_refuses_transcoders():
    coder = build_coder(CoderConfig(d_in=16, n_features=32, activation="topk", k=4))
    x = torch.randn(8, 16)
    out = with_inference(coder, "gp", 3)(x)
    assert out.out.shape == (8, 16) and int((out.acts > 0).sum(1).max()) <= 3
    assert with_inference(coder, "encoder") is coder
    tc = build_coder(CoderConfig(d_in=16, n_features=32, activation="topk", k=4, kind="transcoder", d_out=8))
    with pytest.raises(ValueError, match="needs an SAE"):
        PursuitCoder(tc, "mp", 3)
    with pytest.raises(ValueError, match="use one of"):
        with_inference(coder, "omp", 3)
