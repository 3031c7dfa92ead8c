"""train/sparse_adam.py: W_enc's and W_dec's Adam steps from the sparse path's factors give the
training the ordinary gradients and torch.optim.Adam give, without storing the gradients."""

import pytest
import torch

from monosemantic.coders import kernels
from monosemantic.toy import ToyConfig, ToyData
from monosemantic.train import CoderSpec, TrainConfig, Trainer
from monosemantic.coders.sparse import squared_error
from monosemantic.train.sparse_adam import SparseAdamStep
from monosemantic.train.toy_run import HOOKPOINT, toy_batches

TOY = ToyConfig(d=16, n_features=32, mean_active=2, seed=1)

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="no C compiler: kernels not built")


def _train(out, **kw):
    cfg = TrainConfig(**{**dict(k=3, tokens=256 * 12, batch_size=256, n_features=48, lr=3e-3,
                                log_every=100, checkpoint_every=1000), **kw})
    kind = cfg.kind
    widths = {HOOKPOINT: TOY.d, "out": TOY.d}
    spec = CoderSpec("c", HOOKPOINT, cfg, out_hookpoint="" if kind == "sae" else "out")
    tr = Trainer([spec], widths, out)
    seen = []
    step = tr._step

    def spy(st, batch, i):
        step(st, batch, i)
        seen.append((st.coder.W_enc.grad is None, st.coder.W_dec.grad is None))
    tr._step = spy

    def batches(start):
        for b in toy_batches(ToyData(TOY), 256, 0)(start):
            x = b[HOOKPOINT]
            yield {HOOKPOINT: x, "out": x.flip(1) * 0.5}
    tr.fit(batches, progress=False)
    return tr.states[0], seen


AUXK = {"dead_tokens": 256, "n_features": 400}  # many features dead after one batch: AuxK runs


@pytest.mark.parametrize("extra", [{}, AUXK, {"kind": "transcoder"},
                                   {"activation": "batchtopk", "grad_clip": 0.0, **AUXK}],
                         ids=["topk", "topk-auxk", "transcoder", "batchtopk-auxk"])
def test_fused_adam_trains_as_torch_adam_does(tmp_path, monkeypatch, extra):
    # the Adam steps are the subject: the plain run has no sink and so no bf16 screen, whose
    # fp32 values differ from the GEMM's in rounding, enough to part two runs over 12 steps
    # where two toy features tie (tests/unit/test_sparse.py checks the screen itself)
    monkeypatch.setenv("MONOSEMANTIC_BF16_SCREEN", "0")
    rows = []
    take_rows = SparseAdamStep.take_rows
    monkeypatch.setattr(SparseAdamStep, "take_rows", lambda self, *a: (rows.append(a[0]), take_rows(self, *a)))
    fused, seen = _train(tmp_path / "fused", **extra)
    plain, plain_seen = _train(tmp_path / "plain", sparse_adam=False, **extra)
    assert all(enc and dec for enc, dec in seen)  # no [F, D] gradient was ever stored
    assert not any(enc or dec for enc, dec in plain_seen)
    # with AuxK the dead rows' dense gradients were folded into both weights' steps
    if "dead_tokens" in extra:
        assert rows
    for name, p in plain.coder.named_parameters():
        torch.testing.assert_close(getattr(fused.coder, name), p, rtol=2e-3, atol=2e-4, msg=name)
    for p, q in zip(plain.coder.parameters(), fused.coder.parameters()):
        a, b = plain.opt.state[p], fused.opt.state[q]
        assert float(a["step"]) == float(b["step"]) == 12
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], rtol=5e-3, atol=1e-9)


def test_fused_adam_stays_off_with_gradient_clipping(tmp_path):
    _, seen = _train(tmp_path / "clip", grad_clip=1.0)
    assert not any(enc or dec for enc, dec in seen)


def test_squared_error_matches_mse_loss_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(700, 9, generator=gen, requires_grad=True)
    target = torch.randn(700, 9, generator=gen, requires_grad=True)
    loss = squared_error(pred, target)
    ref = torch.nn.functional.mse_loss(pred, target, reduction="sum")
    torch.testing.assert_close(loss, ref)
    g = torch.autograd.grad(loss * 3, (pred, target))
    h = torch.autograd.grad(ref * 3, (pred, target))
    for a, b in zip(g, h):
        torch.testing.assert_close(a, b)


def test_workspace_reuses_and_grows_its_buffers():
    from monosemantic.coders.sparse import Workspace

    ws, like = Workspace(), torch.zeros(1)
    a = ws.get("x", (4, 3), like)
    b = ws.get("x", (2, 5), like)
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 5)  # reused
    c = ws.get("x", (5, 5), like)
    assert c.shape == (5, 5) and ws.buffers["x"].numel() == 25  # grown
    assert ws.get("y", (3,), like).data_ptr() != c.data_ptr()
    assert ws.get("x", (2,), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
