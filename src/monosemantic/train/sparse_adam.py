"""Adam for W_enc and W_dec straight from the sparse path's factors: no [F, D] gradient is stored.

On the sparse path (coders/sparse.py) the gradients of the two big weights are products S^T @ R of
the batch's active set S [B, F] (about k entries per row) and a dense [B, D] matrix: the input
for W_enc (less a rank-one term, the centre folded into the encoder bias, `minus`), the output's
gradient for W_dec. `SparseAdamStep` receives those factors from the
backward (`take`) and hands them to the compiled kernel `kernels.sparse_adam`, which forms each
feature's gradient row, removes its component along the decoder row (the decoder-norm constraint),
takes torch.optim.Adam's step on that row, and renormalises it, one row at a time. The gradients
never exist as [F, D] tensors (40 MB at F = 9,216, d = 576, and two more allocations per step),
and the optimizer's results are unchanged: the same Adam, on the same state tensors
(`opt.state[p]`, so checkpoints, resampling and resumption see nothing different), up to float
rounding (tests/unit/test_sparse_adam.py).

When no other gradient reaches the weights in a step (no AuxK term), each update runs inside the
backward, as soon as its factors exist: the decoder's in the same pass that computes d acts from
the decoder's rows as they were. With AuxK, the dead features' rows get a second, dense gradient
from the auxiliary loss (`take_rows`), so the updates wait for the end of the backward (`finish`).

The trainer uses it where its conditions hold (`usable`): the compiled kernels, a plain Adam (no
weight decay, amsgrad or maximize), no gradient clipping (which needs the whole gradient's norm
first) and no data-parallel all-reduce of gradients. Everything else takes the ordinary path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..coders import kernels
from ..coders.sparse import Workspace

WEIGHTS = ("W_enc", "W_dec")


class SparseAdamStep:
    """One training step's Adam update of a coder's W_enc and W_dec from the sparse factors.

    `exclusive`: no gradient but the sparse path's reaches them this step, so each is updated as
    soon as its factors arrive. `constrained`: W_dec's rows are kept at unit norm. `workspace`:
    the training state's buffers, which the sparse path then writes its temporaries into."""

    def __init__(self, opt: torch.optim.Adam, coder, constrained: bool, exclusive: bool,
                 workspace: Workspace | None = None):
        self.opt, self.coder = opt, coder
        self.workspace = workspace
        """Where the sparse path puts its step's large temporaries (coders/sparse.Workspace)."""
        self.constrained, self.exclusive = constrained, exclusive
        self.params = {name: getattr(coder, name) for name in WEIGHTS}
        self.terms: dict[str, list] = {name: [] for name in WEIGHTS}
        self.rows: dict[str, list] = {name: [] for name in WEIGHTS}
        self.applied: set[str] = set()

    @staticmethod
    def usable(opt: torch.optim.Optimizer, coder, grad_clip: float | None, gradients_reduced: bool) -> bool:
        if grad_clip or gradients_reduced or not isinstance(opt, torch.optim.Adam):
            return False
        if not kernels.usable_for(*(getattr(coder, n) for n in WEIGHTS)):
            return False
        return all(not g["amsgrad"] and not g["maximize"] and not g["weight_decay"]
                   and not g.get("decoupled_weight_decay") for g in opt.param_groups)

    def take(self, name: str, offsets: Tensor, index: Tensor, values: Tensor, R: Tensor,
             dots_with: Tensor | None = None, minus: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
        """The weight `name` has gradient S^T @ R from this term (S = CSR offsets, index, values
        [B, F]), less the outer product minus = (u [F], c [D]) when given (the encoder's centre,
        folded into its bias). With `dots_with` (the weight itself), returns [N] <R[b], W[f]> per
        entry, W as it was before any update (the decoder's d acts)."""
        if name in self.applied:
            raise RuntimeError(f"{name} received a second gradient term after its update; "
                               "SparseAdamStep(exclusive=True) is for steps with one term each")
        values = values.detach()
        if self.exclusive:
            self.applied.add(name)
            return self._apply(name, (offsets, index, values, R, minus), dots=dots_with is not None)
        self.terms[name].append((offsets, index, values, R, minus))
        return None if dots_with is None else kernels.sampled_dot(offsets, index, R, dots_with)

    def take_rows(self, name: str, rows: Tensor, grad: Tensor) -> None:
        """The weight `name` has gradient `grad` [n, D] on its rows `rows` [n] from this term."""
        if self.exclusive or name in self.applied:
            raise RuntimeError(f"a dense gradient for {name}'s rows reached a step that had updated it")
        self.rows[name].append((rows, grad.detach()))

    def finish(self) -> None:
        """After the backward: apply what waited (a single sparse term plus dense rows goes
        through the kernel; anything else becomes an ordinary .grad for the optimizer)."""
        for name in WEIGHTS:
            terms, rows = self.terms[name], self.rows[name]
            if not terms and not rows:
                continue
            if rows:
                idx = torch.cat([r for r, _ in rows])
                grad = torch.cat([g for _, g in rows])
                uniq, inverse = idx.unique(return_inverse=True)
                extra = grad.new_zeros(uniq.numel(), grad.shape[1]).index_add_(0, inverse, grad)
            else:
                uniq = extra = None
            if len(terms) == 1:
                self._apply(name, terms[0], extra_rows=uniq, extra=extra)
                self.applied.add(name)
                continue
            p = self.params[name]
            g = torch.zeros_like(p)
            for offsets, index, values, R, minus in terms:
                g += kernels.t_matmul(offsets, index, values, p.shape[0], R)[0]
                if minus is not None:
                    g.addr_(*minus, alpha=-1)
            if uniq is not None:
                g.index_add_(0, uniq, extra)
            p.grad = g if p.grad is None else p.grad + g
        self.terms = {name: [] for name in WEIGHTS}
        self.rows = {name: [] for name in WEIGHTS}

    @property
    def decoder_done(self) -> bool:
        """Whether W_dec's step (and its renormalisation) has been taken here."""
        return "W_dec" in self.applied

    def _apply(self, name: str, term, extra_rows: Tensor | None = None, extra: Tensor | None = None,
               dots: bool = False) -> Tensor | None:
        p = self.params[name]
        group = next(g for g in self.opt.param_groups if any(q is p for q in g["params"]))
        state = self.opt.state[p]
        if not state:  # as torch.optim.Adam(fused=True) lays it out, so either can continue it
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        decoder = name == "W_dec" and self.constrained
        offsets, index, values, R, minus = term
        with torch.no_grad():
            return kernels.sparse_adam(offsets, index, values, R, p, state["exp_avg"], state["exp_avg_sq"],
                                       lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                                       eps=float(group["eps"]), step=int(state["step"].item()),
                                       extra_rows=extra_rows, extra=extra, minus=minus, project=decoder,
                                       unit=decoder, dots=dots)
