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
     tokens, nor the coder's outlier tokens when it drops them), all coders at once, so a later
     coder reads what the earlier ones left; the model is never re-implemented, only hooked
     (hooks.patch);
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
                 exclude_ids: list[int] | None = None, contexts: int = 0):
        """`contexts`: token contexts per global batch (needed when training runs on several
        ranks, which split them)."""
        for p in model.parameters():  # frozen: gradients go through the model, never into it
            p.requires_grad_(False)
        self.model, self.config, self.contexts = model.eval(), config, contexts
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
        """One spliced step for every coder of `trainer` (a train.loop.Trainer).

        Under torchrun each rank runs its own contexts and every mean over tokens becomes its
        rank's share of the global mean (a term's mean times this rank's count over the global
        count; the downstream term's denominators are global sums), so that the ranks' gradients
        add up to one process's on the whole batch: in data mode they are summed by an all-reduce;
        in layers mode each coder runs on its owner, on the global batch (`_RemoteCoder`)."""
        cfg, par = self.config, trainer.parallel
        records: dict[str, dict] = {}
        remote = par.mode == "layers"
        fns = (_remote_splice_functions if remote else _splice_functions)(trainer, clean.mask, records, step)
        out = spliced_forward(self.model, clean.tokens, clean.mask, fns, clean.logits, clean.layers)
        kl, terms = out.kl, {st.spec.name: _sparsity_term(st, records[st.spec.name], step, trainer.steps)
                             for st in trainer.states if not remote}  # remote: applied by owners
        ds = dict(out.ds)
        if par.world > 1:
            mask = clean.mask
            sq = [clean.layers[name][mask].float().pow(2).sum() for name in ds]
            kept = [float(records[name]["x"].shape[0]) for name in terms]
            local = torch.tensor([float(mask.sum()), *kept, *sq], dtype=torch.float64)
            total = par.sum(local.clone(), "summing token counts").clamp_min(1e-12)
            share = (local / total).tolist()
            kl = kl * share[0]
            terms = {name: t * w for (name, t), w in zip(terms.items(), share[1:1 + len(kept)])}
            ds = {name: v * w for (name, v), w in zip(ds.items(), share[1 + len(kept):])}
        ds_sum = sum(ds.values()) if ds else kl.new_zeros(())
        loss = cfg.kl_coef * kl + cfg.ds_coef * ds_sum
        for term in terms.values():
            loss = loss + term
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the {cfg.loss} loss became {float(loss)} at step {step}; "
                                     "lower --lr or --coef. The last checkpoint is untouched.")
        for st in trainer.states:
            c = st.spec.config
            for g in st.opt.param_groups:
                g["lr"] = st.res.lr * lr_factor(step, trainer.steps, c.lr_warmup, c.lr_decay)
            st.opt.zero_grad(set_to_none=True)
        loss.backward()
        if par.mode == "data":
            for st in trainer.states:  # each rank's loss is its share: the sum is the gradient
                par.reduce_gradients(st.coder)
        shown = float(sum(out.ds.values()).detach()) if out.ds else 0.0
        for st in trainer.states:
            _update(st, records[st.spec.name], step, float(loss.detach()), out, shown, par)


def _splice_functions(trainer, mask: Tensor, records: dict[str, dict], step: int = 0
                      ) -> dict[str, Callable]:
    """Hook functions that read each coder's input and write its output at the kept positions;
    `records[name]` receives what the coder read and wrote (normalised units)."""
    pos = mask.reshape(-1).nonzero(as_tuple=True)[0]
    states = {st.spec.name: st for st in trainer.states}
    return _hooks([(st.spec, records.setdefault(st.spec.name, {})) for st in trainer.states],
                  lambda spec, rec: _writer(trainer, states[spec.name], pos, rec))


def _remote_splice_functions(trainer, mask: Tensor, records: dict[str, dict], step: int
                             ) -> dict[str, Callable]:
    """Layers mode: hook functions for every coder of the run, owned here or not; each writer
    sends this rank's rows to the coder's owner and writes back what the owner computed
    (`_RemoteCoder`). `records` receives the owned coders' records (global rows)."""
    par = trainer.parallel
    pos = mask.reshape(-1).nonzero(as_tuple=True)[0]
    counts = par.row_counts(pos.numel())
    owned = {st.spec.name: st for st in trainer.states}
    pairs = [(spec, records.setdefault(spec.name, {}) if spec.name in owned else {})
             for spec in trainer.specs]
    return _hooks(pairs, lambda spec, rec: _remote_writer(trainer, spec, owned.get(spec.name), pos,
                                                          counts, rec, step))


def _hooks(pairs: list, writer: Callable) -> dict[str, Callable]:
    """hookpoint -> one function that records the inputs transcoders read there and applies the
    writer of the coder that writes there."""
    reads: dict[str, list[Callable]] = {}
    writes: dict[str, Callable] = {}
    for spec, rec in pairs:
        hp_out = spec.out_hookpoint or spec.hookpoint
        if spec.out_hookpoint:
            reads.setdefault(spec.hookpoint, []).append(
                lambda t, rec=rec: rec.__setitem__("input", t))
        writes[hp_out] = writer(spec, rec)
    fns = {}
    for h in dict.fromkeys([*reads, *writes]):
        def fn(t: Tensor, rs=reads.get(h, []), w=writes.get(h)) -> Tensor | None:
            for r in rs:
                r(t)
            return None if w is None else w(t)
        fns[h] = fn
    return fns


def _writer(trainer, st, pos: Tensor, rec: dict) -> Callable[[Tensor], Tensor]:
    def write(t: Tensor) -> Tensor:
        inp = rec.get("input", t)
        x = inp.reshape(-1, inp.shape[-1])[pos].float()
        keep, pred = _apply_coder(trainer, st, x, t.reshape(-1, t.shape[-1])[pos].float(), rec)
        flat = t.reshape(-1, t.shape[-1]).index_put((pos[keep],), (pred / st.scale_out).to(t.dtype))
        return flat.reshape(t.shape)
    return write


def _apply_coder(trainer, st, x: Tensor, y: Tensor, rec: dict) -> tuple[Tensor, Tensor]:
    """Run a coder on raw rows x (input) and y (its hookpoint's clean output): drop its outliers if
    it drops them, scale, forward; fill `rec` (normalised units). Returns (kept rows [n] bool, the
    prediction for them in normalised units)."""
    coder, c = st.coder, st.spec.config
    keep, n_out = trainer._keep(st, x)
    if keep is None:
        keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    x, y = x[keep] * st.scale_in, (y[keep] * st.scale_out).detach()
    if c.sparse_path and coder.has_sparse_path:
        sparse, dense = coder.forward_sparse(x), None
        pred = sparse.out
    else:
        dense, sparse = coder(x, target=None if c.kind == "sae" else y), None
        pred = dense.out
    rec.update(x=x, y=y, pred=pred, dense=dense, sparse=sparse, n_out=n_out)
    return keep, pred


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
        pre = None if dense is None else dense.pre_acts
        # the MSE over the residual's variance, weighed by that variance: the MSE itself
        term = term + c.auxk_coef * coder.auxk_loss(x, y, pre, st.dead.dead_mask, st.res.k_aux,
                                                    out=pred.detach(), normalize=False)
    return term


class _Job:
    """What `_RemoteCoder` needs for one coder at one step."""

    def __init__(self, par, owner: int, counts: list[int], run: Callable | None):
        self.par, self.owner, self.counts, self.run = par, owner, counts, run
        self.saved: tuple | None = None


class _RemoteCoder(torch.autograd.Function):
    """Layers mode: this rank's rows x [n_r, D_in] (and its clean output rows y [n_r, D_out])
    -> what the coder writes there [n_r, D_out], computed by the coder's owner on the global batch.
    Backward sends d loss / d output to the owner, which backpropagates through its coder (plus the
    coder's sparsity term, once) and returns d loss / d x. Every rank reaches each coder's forward
    and backward in the same order (same model, same hooks), so the point-to-point messages pair."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, job: _Job, anchor: Tensor) -> Tensor:
        # anchor: a scalar that requires grad, so that autograd records this node on every rank
        # even where x does not require grad (the coder's parameters live on the owner only)
        par, owner, counts = job.par, job.owner, job.counts
        xs = par.gather_to(owner, x.detach(), counts, "sending rows to a coder's owner")
        ys = par.gather_to(owner, y.detach(), counts, "sending rows to a coder's owner")
        sent = None
        if par.rank == owner:
            with torch.enable_grad():
                xs.requires_grad_(ctx.needs_input_grad[0])
                written, term = job.run(xs, ys)
            job.saved = (xs, written, term)
            sent = written.detach()
        ctx.job, ctx.d_in = job, x.shape[-1]
        return par.scatter_from(owner, sent, counts, y.shape[-1], "returning a coder's output", y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        job = ctx.job
        par, owner, counts = job.par, job.owner, job.counts
        grads = par.gather_to(owner, grad.contiguous(), counts, "sending gradients to a coder's owner")
        d_x = None
        if par.rank == owner:
            xs, written, term = job.saved
            outs, grad_outs = [written], [grads]
            if term.requires_grad:
                outs.append(term)
                grad_outs.append(torch.ones_like(term))
            with torch.enable_grad():
                torch.autograd.backward(outs, grad_outs)
            d_x = xs.grad if xs.grad is not None else torch.zeros_like(xs)
            job.saved = None
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return par.scatter_from(owner, d_x, counts, ctx.d_in, "returning gradients to the ranks",
                                grad), None, None, None


def _remote_writer(trainer, spec, st, pos: Tensor, counts: list[int], rec: dict,
                   step: int) -> Callable[[Tensor], Tensor]:
    par = trainer.parallel
    owner = par.owner[spec.name]

    def run(xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        """On the owner: the coder on the global rows -> (rows to write, sparsity term)."""
        keep, pred = _apply_coder(trainer, st, xs, ys, rec)
        written = ys.index_put((keep.nonzero(as_tuple=True)[0],), pred / st.scale_out)
        return written, _sparsity_term(st, rec, step, trainer.steps)

    def write(t: Tensor) -> Tensor:
        inp = rec.get("input", t)
        x = inp.reshape(-1, inp.shape[-1])[pos].float()
        y = t.reshape(-1, t.shape[-1])[pos].float().detach()
        job = _Job(par, owner, counts, run if par.rank == owner else None)
        written = _RemoteCoder.apply(x, y, job, torch.zeros((), requires_grad=True))
        flat = t.reshape(-1, t.shape[-1]).index_put((pos,), written.to(t.dtype))
        return flat.reshape(t.shape)
    return write


def _update(st, rec: dict, step: int, loss: float, out: Spliced, ds: float, par=None) -> None:
    coder, c = st.coder, st.spec.config
    st.optimizer_step()
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
        xs, ys = (x.detach(), y) if par is None else par.gather_rows(x.detach(), y)
        resample_dead(coder, st.opt, xs, ys, st.dead.dead_mask, gen)
    total = float((y - y.mean(0)).pow(2).sum())
    st.last = {"loss": loss, "kl": float(out.kl.detach()), "ds": ds,
               "fvu": float((y - pred).pow(2).sum()) / total if total > 0 else math.nan,
               "l0": l0, "dead": st.dead.dead_fraction, "lr": st.opt.param_groups[0]["lr"]}
