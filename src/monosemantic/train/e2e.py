"""End-to-end and downstream losses: train coders through the frozen model they are spliced into.

Follows Braun, Taylor, Goldowsky-Dill & Sharkey 2024 ("Identifying functionally important features
with end-to-end sparse dictionary learning"). The losses (`LossConfig.loss`):

  local    reconstruct the hookpoint (train/loop.py, on cached activations);
  e2e      kl_coef * KL(clean || spliced) of the next-token distributions + the sparsity term;
  e2e+ds   e2e + ds_coef * sum over every block output l after the earliest spliced hookpoint of
           ||h_l(spliced) - h_l(clean)||^2 / E||h_l(clean)||^2   (mean over kept tokens);
and the cheap route: local for the first (1 - kl_finetune_frac) of the steps, then e2e (KL only).

Each step reads a batch of token contexts [B, T] (`token_batches`) and:
  1. clean forward, no gradient: the logits, every coder's hookpoints, the blocks the ds term needs
     (local steps only run as far as the deepest hookpoint);
  2. spliced forward: each coder replaces its (output) hookpoint at the kept positions (not special
     tokens, not the coder's outlier tokens), all coders at once, so a later coder reads what the
     earlier ones left; the model is never re-implemented, only hooked (hooks.patch);
  3. loss as above; the sparsity term is coef * penalty for the penalty family, and for the top-k
     family (k fixes L0) AuxK on the coder's local residual, the only gradient dead features get;
  4. backward: the model's parameters have requires_grad False (checked), so the gradient passes
     through its activations into the coders and nowhere else; then per coder the trainer's usual
     update (decoder-gradient projection, Adam with the scheduled LR, unit-norm rows, dead counters).

Shapes: B contexts, T tokens per context, D width, F features, V vocabulary, N kept tokens.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from ..data.tokens import iter_contexts, keep_mask
from ..hooks import Hookpoint, capture, patch, run_to_hookpoints
from ..models import decoder_layers
from .config import lr_factor, ramp
from .dead import resample_dead

LOSSES = ("local", "e2e", "e2e+ds")


@dataclass(frozen=True)
class LossConfig:
    """What the coders are trained to do (one objective for every coder of a run)."""

    loss: str = "local"
    """local: reconstruct the hookpoint's activations (squared error, on cached activations; the
    cheapest). e2e (Braun et al. 2024): with every coder spliced into the frozen model, match the
    clean next-token distribution, kl_coef x KL(clean || spliced) in nats per token, plus the
    sparsity term; the model runs forward twice and backward once per step (far costlier per
    token than local training on cached activations; benchmarks/e2e_comparison.py reports both)
    and its weights never change. e2e+ds: e2e plus ds_coef x the downstream term,
    which keeps the residual stream of the spliced run close to the clean one at every later block."""
    kl_coef: float = 1.0
    """Multiplies the KL term (e2e, e2e+ds, and the KL fine-tune). Sparsity is set against it by
    --k (top-k family) or --coef (penalty family): KL is in nats per token (about 0.01-1), far below
    the local loss (about D x FVU on normalised inputs), so a --coef tuned for local training is far
    too strong for e2e; scan it."""
    ds_coef: float = 1.0
    """e2e+ds: multiplies the downstream term, the sum over the block outputs after the earliest
    spliced hookpoint (HF module names, e.g. model.layers.7 ... model.layers.29) of each block's
    squared error summed over D, mean over kept tokens, divided by the clean block's mean squared
    norm (so every block counts as a fraction of its own scale)."""
    kl_finetune_frac: float = 0.0
    """With --loss local: train locally for the first (1 - frac) of the steps, then fine-tune on
    the e2e KL (kl_coef, same sparsity term) for the last frac of the budget, the cheap route to
    functionally relevant features; 0 = off. The whole run then reads token contexts and runs the
    model, with no activation cache."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.kl_coef < 0 or self.ds_coef < 0:
            raise ValueError(f"kl_coef={self.kl_coef} and ds_coef={self.ds_coef} must be >= 0")
        if not 0 <= self.kl_finetune_frac < 1:
            raise ValueError(f"kl_finetune_frac={self.kl_finetune_frac} must lie in [0, 1)")
        if self.kl_finetune_frac > 0 and self.loss != "local":
            raise ValueError(f"kl_finetune_frac={self.kl_finetune_frac} fine-tunes a locally "
                             f"trained coder; with --loss {self.loss} every step is already e2e: "
                             "drop --kl-finetune-frac or use --loss local")

    @property
    def needs_model(self) -> bool:
        """Whether training runs the model (any e2e step) rather than reading cached activations."""
        return self.loss != "local" or self.kl_finetune_frac > 0

    def first_spliced_step(self, steps: int) -> int:
        """The first step trained on the spliced loss (steps when none is)."""
        if self.loss != "local":
            return 0
        return steps - int(round(self.kl_finetune_frac * steps)) if self.kl_finetune_frac > 0 else steps

    def to_dict(self) -> dict:
        return asdict(self)


# ---- data: token contexts ---------------------------------------------------------------------

def token_batches(tokenizer, documents: list[str], ctx_len: int, bos_id: int, contexts: int,
                  n_contexts: int, seed: int = 0) -> Callable[[int], Iterator[dict[str, Tensor]]]:
    """start_step -> endless {"tokens": [contexts, ctx_len]} batches over the first `n_contexts`
    packed contexts of `documents`, each epoch a fresh permutation; batch s depends only on
    (seed, s), so a resumed run sees the batches an uninterrupted one would."""
    pool = np.stack(list(itertools.islice(iter_contexts(tokenizer, documents, ctx_len, bos_id),
                                          max(n_contexts, contexts))) or [np.zeros(ctx_len, np.int64)])
    if len(pool) < contexts:
        raise ValueError(f"the corpus gives {len(pool)} contexts of {ctx_len} tokens, fewer than "
                         f"one batch ({contexts}); use a larger corpus or a smaller --batch-size")
    per_epoch = len(pool) // contexts

    def from_step(start: int) -> Iterator[dict[str, Tensor]]:
        step = start
        while True:
            epoch, offset = divmod(step, per_epoch)
            perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + epoch))
            for j in range(offset, per_epoch):
                yield {"tokens": torch.from_numpy(pool[perm[j * contexts:(j + 1) * contexts].numpy()])}
                step += 1
    return from_step


# ---- which blocks are downstream ---------------------------------------------------------------

def downstream_layers(model: nn.Module, hookpoints: list[str]) -> list[str]:
    """The block outputs (HF module names) computed after the earliest of `hookpoints`: every block
    after the one holding it, and that block too when the hookpoint lies inside it (a submodule or
    the block's input) rather than at its output."""
    layers = decoder_layers(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    starts = []
    for h in hookpoints:
        hp = Hookpoint.parse(h)
        inside = [i for i, name in enumerate(layers)
                  if hp.module == name or hp.module.startswith(name + ".")]
        if inside:
            i = inside[0]
            starts.append(i + 1 if hp.module == layers[i] and hp.side == "output" else i)
        else:  # an embedding runs before every block; a final norm after all of them
            starts.append(0 if order.get(hp.module, 0) < order[layers[0]] else len(layers))
    return layers[min(starts):] if starts else []


# ---- the loss terms ----------------------------------------------------------------------------

def kl_next_token(clean_logits: Tensor, spliced_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over the positions in `mask` [B, T] of KL(clean || spliced) (nats), differentiable
    in the spliced logits [B, T, V]."""
    logp = F_.log_softmax(clean_logits.float(), -1)
    logq = F_.log_softmax(spliced_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)[mask].mean()


def relative_error(spliced: Tensor, clean: Tensor, mask: Tensor) -> Tensor:
    """||spliced - clean||^2 summed over D, mean over the positions in `mask`, divided by the
    clean stream's mean squared norm there."""
    clean, spliced = clean[mask].float(), spliced[mask].float()
    return (spliced - clean).pow(2).sum(-1).mean() / clean.pow(2).sum(-1).mean().clamp_min(1e-12)


class Spliced(NamedTuple):
    """One spliced forward pass: its logits, the KL to the clean run and the downstream terms."""

    logits: Tensor
    kl: Tensor
    ds: dict[str, Tensor]
    """block name -> relative squared error (empty when no blocks were asked for)."""


def spliced_forward(model: nn.Module, tokens: Tensor, mask: Tensor, fns: dict[str, Callable],
                    clean_logits: Tensor, clean_layers: dict[str, Tensor]) -> Spliced:
    """Run `model` on `tokens` with `fns` patched in (hookpoint -> tensor -> tensor), keeping the
    autograd graph; compare with the clean run at the positions in `mask` [B, T]."""
    with patch(model, fns), capture(model, list(clean_layers), detach=False) as acts:
        logits = model(input_ids=tokens, use_cache=False).logits
    ds = {name: relative_error(acts[name], clean, mask) for name, clean in clean_layers.items()}
    return Spliced(logits, kl_next_token(clean_logits, logits, mask), ds)


# ---- the objective the Trainer calls -----------------------------------------------------------

class Clean(NamedTuple):
    """A batch of contexts and what the clean model computed on it."""

    tokens: Tensor
    mask: Tensor
    """[B, T] positions whose token is kept (not a special token)."""
    acts: dict[str, Tensor]
    """hookpoint -> [N, D] at the kept positions: what the local step and initialisation read."""
    logits: Tensor | None
    """[B, T, V] on spliced steps, else None."""
    layers: dict[str, Tensor]
    """block name -> [B, T, D] clean outputs the downstream term compares against."""
    spliced: bool


class SplicedObjective:
    """The Trainer's objective for e2e, e2e+ds and the KL fine-tune (train/loop.py calls `clean`
    on every batch of token contexts, then `step` on spliced steps)."""

    def __init__(self, model: nn.Module, config: LossConfig, specs: list, steps: int,
                 exclude_ids: list[int] | None = None):
        for p in model.parameters():  # frozen: gradients go through the model, never into it
            p.requires_grad_(False)
        self.model, self.config = model.eval(), config
        self.exclude_ids = list(exclude_ids or [])
        self.hookpoints = list(dict.fromkeys(h for s in specs for h in (s.hookpoint, s.out_hookpoint) if h))
        self.first_spliced = config.first_spliced_step(steps)
        self.layers = (downstream_layers(model, [s.hookpoint for s in specs])
                       if config.loss == "e2e+ds" else [])
        written = [s.out_hookpoint or s.hookpoint for s in specs]
        twice = {h for h in written if written.count(h) > 1}
        if twice:
            raise ValueError(f"two coders write {sorted(twice)}: spliced training replaces each "
                             "hookpoint once; train them in separate runs")

    def clean(self, batch: dict[str, Tensor], step: int) -> Clean:
        device = next(self.model.parameters()).device
        tokens = batch["tokens"].to(device)
        mask = keep_mask(tokens.cpu(), self.exclude_ids).to(device)
        spliced = step >= self.first_spliced
        with torch.no_grad():
            if spliced:
                with capture(self.model, self.hookpoints + [l for l in self.layers
                                                            if l not in self.hookpoints]) as acts:
                    logits = self.model(input_ids=tokens, use_cache=False).logits
            else:
                acts, logits = run_to_hookpoints(self.model, tokens, self.hookpoints), None
        flat = {h: acts[h][mask].float() for h in self.hookpoints}
        return Clean(tokens, mask, flat, logits, {l: acts[l] for l in self.layers}, spliced)

    def step(self, trainer, clean: Clean, step: int) -> None:
        """One spliced step for every coder of `trainer` (a train.loop.Trainer)."""
        cfg = self.config
        records: dict[str, dict] = {}
        fns = _splice_functions(trainer, clean.mask, records)
        out = spliced_forward(self.model, clean.tokens, clean.mask, fns, clean.logits, clean.layers)
        ds = sum(out.ds.values()) if out.ds else out.kl.new_zeros(())
        loss = cfg.kl_coef * out.kl + cfg.ds_coef * ds
        for st in trainer.states:
            loss = loss + _sparsity_term(st, records[st.spec.name], step, trainer.steps)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the {cfg.loss} loss became {float(loss)} at step {step}; "
                                     "lower --lr or --coef. The last checkpoint is untouched.")
        for st in trainer.states:
            c = st.spec.config
            for g in st.opt.param_groups:
                g["lr"] = st.res.lr * lr_factor(step, trainer.steps, c.lr_warmup, c.lr_decay)
            st.opt.zero_grad(set_to_none=True)
        loss.backward()
        for st in trainer.states:
            _update(st, records[st.spec.name], step, float(loss.detach()), out, ds.detach())


def _splice_functions(trainer, mask: Tensor, records: dict[str, dict]) -> dict[str, Callable]:
    """Hook functions that read each coder's input and write its output at the kept positions;
    `records[name]` receives what the coder read and wrote (normalised units)."""
    reads: dict[str, list[Callable]] = {}
    writes: dict[str, Callable] = {}
    pos = mask.reshape(-1).nonzero(as_tuple=True)[0]
    for st in trainer.states:
        spec = st.spec
        rec = records.setdefault(spec.name, {})
        hp_out = spec.out_hookpoint or spec.hookpoint
        if spec.out_hookpoint:
            reads.setdefault(spec.hookpoint, []).append(
                lambda t, rec=rec: rec.__setitem__("input", t))
        writes[hp_out] = _writer(trainer, st, pos, rec)
    fns = {}
    for h in dict.fromkeys([*reads, *writes]):
        def fn(t: Tensor, rs=reads.get(h, []), w=writes.get(h)) -> Tensor | None:
            for r in rs:
                r(t)
            return None if w is None else w(t)
        fns[h] = fn
    return fns


def _writer(trainer, st, pos: Tensor, rec: dict) -> Callable[[Tensor], Tensor]:
    coder, c = st.coder, st.spec.config

    def write(t: Tensor) -> Tensor:
        inp = rec.get("input", t)
        x = inp.reshape(-1, inp.shape[-1])[pos].float()
        keep = trainer._keep(st, x)
        rows = pos[keep]
        x = x[keep] * st.scale_in
        y = (t.reshape(-1, t.shape[-1])[rows].float() * st.scale_out).detach()
        if c.sparse_path and coder.has_sparse_path:
            sparse = coder.forward_sparse(x)
            pred, dense = sparse.out, None
        else:
            dense = coder(x, target=None if c.kind == "sae" else y)
            pred, sparse = dense.out, None
        rec.update(x=x, y=y, pred=pred, dense=dense, sparse=sparse, n_out=int((~keep).sum()))
        flat = t.reshape(-1, t.shape[-1]).index_put((rows,), (pred / st.scale_out).to(t.dtype))
        return flat.reshape(t.shape)
    return write


def _sparsity_term(st, rec: dict, step: int, steps: int) -> Tensor:
    """coef x penalty (penalty family) or auxk_coef x AuxK on the local residual (top-k family)."""
    c, coder, dense = st.spec.config, st.coder, rec["dense"]
    term = rec["pred"].new_zeros(())
    if dense is not None:
        term = term + dense.aux_loss
        if c.coef > 0 and coder.cfg.resolved_penalty != "none":
            p = c.p if c.p_end <= 0 else c.p + (c.p_end - c.p) * step / max(1, steps - 1)
            penalty = dense.sparsity_loss if c.p_end <= 0 else coder.sparsity_penalty(dense.acts, dense.pre_acts, p)
            term = term + c.coef * ramp(step, steps, c.coef_warmup) * penalty
    if coder.cfg.k is not None and c.auxk_coef > 0 and bool(st.dead.dead_mask.any()):
        x, y, pred = rec["x"].detach(), rec["y"], rec["pred"]
        err = (y - pred).detach()
        pre = None if dense is None else dense.pre_acts
        auxk = coder.auxk_loss(x, y, pre, st.dead.dead_mask, st.res.k_aux, out=pred.detach())
        term = term + c.auxk_coef * auxk * (err - err.mean(0)).pow(2).sum(-1).mean()
    return term


def _update(st, rec: dict, step: int, loss: float, out: Spliced, ds: Tensor) -> None:
    coder, c = st.coder, st.spec.config
    if st.constrained:
        coder.remove_gradient_parallel_to_decoder()
    st.opt.step()
    if st.constrained:
        coder.set_decoder_to_unit_norm()
    st.n_outliers += rec["n_out"]
    x, y, pred = rec["x"], rec["y"], rec["pred"].detach()
    if rec["sparse"] is None:
        st.dead.update(rec["dense"].acts.detach())
        l0 = float((rec["dense"].acts > 0).sum(-1).float().mean())
    else:
        st.dead.update_fired(rec["sparse"].active.fired(st.res.n_features), x.shape[0])
        l0 = rec["sparse"].active.l0()
    if step in st.res.resample_steps:
        gen = torch.Generator().manual_seed(c.seed * 100003 + step)
        resample_dead(coder, st.opt, x.detach(), y, st.dead.dead_mask, gen)
    total = float((y - y.mean(0)).pow(2).sum())
    st.last = {"loss": loss, "kl": float(out.kl.detach()), "ds": float(ds),
               "fvu": float((y - pred).pow(2).sum()) / total if total > 0 else math.nan,
               "l0": l0, "dead": st.dead.dead_fraction, "lr": st.opt.param_groups[0]["lr"]}
