"""The training loop: several coders from one pass over the activations.

Every step, each coder takes the same batch (its own input hookpoint, and for a transcoder its
output hookpoint):
  1. check the batch is finite (else stop before any weight changes, naming hookpoint/row/dim);
  2. count outlier tokens (norm > outlier_multiple x the median norm measured at start), and with
     drop_outliers leave them out;
  3. scale by the normalisation constants (E||x||^2 = D), forward, and compute
       loss = ||y - y_hat||^2 (summed over dims, mean over tokens)
              + coef(t) * penalty(p(t)) + gated aux + auxk_coef * AuxK (top-k family);
  4. backward; remove the decoder-gradient component parallel to each (unit-norm) decoder row;
     Adam step with the scheduled LR; renormalise the decoder rows;
  5. update the tokens-since-fired counters; resample dead features of penalty architectures on
     schedule.
A checkpoint of everything (weights, Adam moments, counters, scalars) is written atomically every
`checkpoint_every` steps; the batch at step s depends only on (seed, s), so a killed run resumes to
the same bits. At the end the normalisation and decoder norms are folded into the saved weights.

With an `objective` (train/e2e.py: e2e, e2e+ds, the KL fine-tune) the batches are token contexts:
the objective runs the clean model on each, the step-0 initialisation and local steps read the
activations it returns, and spliced steps are its own `step` over all coders at once.

Under torchrun the loop calls `self.parallel` (train/distributed.py) at a few points: `exchange`
the batch (layers mode: activations to the coders' owners), all-reduce gradients after backward
(data mode), reduce state after each step; only rank 0 logs, shows progress and writes.

Shapes: B tokens per batch, D width, F features.
"""

from __future__ import annotations

import logging
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..coders import CoderConfig, SparseCoder, build_coder, kernels
from ..coders.sparse import Workspace, squared_error
from ..coders.init import initialize
from ..utils import atomic_write_json, prefetch, read_json, release_free_memory
from .checkpoint import load_checkpoint, pack_optimizer, unpack_optimizer
from .config import Resolved, TrainConfig, clip_gradients, lr_factor, ramp
from .dead import DeadTracker, resample_dead
from .distributed import Parallel
from .sparse_adam import SparseAdamStep

log = logging.getLogger(__name__)
RUN_FORMAT = "monosemantic.run/1"


@dataclass(frozen=True)
class CoderSpec:
    """One coder to train: where it reads, where it writes, and how it is trained."""

    name: str
    hookpoint: str
    config: TrainConfig
    out_hookpoint: str = ""


@dataclass
class _State:
    spec: CoderSpec
    res: Resolved
    coder: SparseCoder
    opt: torch.optim.Adam
    dead: DeadTracker
    workspace: Workspace = field(default_factory=Workspace)
    """The step's large temporaries, reused from step to step (coders/sparse.Workspace)."""
    scale_in: float = 1.0
    scale_out: float = 1.0
    median_norm: float = 0.0
    n_outliers: int = 0
    last: dict = field(default_factory=dict)

    @property
    def constrained(self) -> bool:
        """Decoder rows kept at unit norm (all but the decoder-norm-weighted l1/lp penalties,
        unless the architecture requires unit norm, as gated does)."""
        return self.coder.unit_norm_decoder or self.coder.cfg.resolved_penalty not in ("l1", "lp")

    def optimizer_step(self, sink: SparseAdamStep | None = None) -> float | None:
        """The update after the backward, for local and e2e training alike: the decoder gradient's
        component along each (unit) row removed, the gradient clipped (grad_clip), Adam, the rows
        renormalised. Returns the gradient norm before clipping (None when clipping is off).
        `sink`: the step's SparseAdamStep, which takes (or has taken) W_enc's and W_dec's part."""
        if sink is not None:
            sink.finish()
        if self.constrained:
            self.coder.remove_gradient_parallel_to_decoder()  # nothing to do without W_dec.grad
        norm = clip_gradients(self.coder, self.res.grad_clip)
        self.opt.step()  # the parameters with a .grad
        if self.constrained and not (sink is not None and sink.decoder_done):
            self.coder.set_decoder_to_unit_norm()
        return norm


Batches = Callable[[int], Iterator[dict[str, Tensor]]]
"""start_step -> iterator of batches (hookpoint -> [B, D]) from that step on."""


class Trainer:
    """Train `specs` on `batches`, writing checkpoints and final coders under `out`."""

    def __init__(self, specs: list[CoderSpec], widths: dict[str, int], out: str | Path,
                 source: dict | None = None, device: str | torch.device = "cpu",
                 parallel: Parallel | None = None, objective=None):
        """`parallel`: this process's place in a torchrun run (train/distributed.py); default: the
        initialised process group in data mode, or one process. `objective`: a
        train.e2e.SplicedObjective (batches are then token contexts); None = local training."""
        if not specs:
            raise ValueError("no coders to train")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"coder names must be unique, got {names}")
        first = specs[0].config
        for s in specs:
            if (s.config.batch_size, s.config.tokens, s.config.seed) != (first.batch_size, first.tokens, first.seed):
                raise ValueError("coders trained in one pass share batch_size, tokens and seed; "
                                 f"{s.name} differs from {specs[0].name}")
            for h in (s.hookpoint, s.out_hookpoint):
                if h and h not in widths:
                    raise ValueError(f"coder {s.name}: hookpoint {h!r} is not in the data "
                                     f"(available: {', '.join(widths)})")
            if s.config.kind != "sae" and not s.out_hookpoint:
                raise ValueError(f"coder {s.name}: a {s.config.kind} needs an output hookpoint")
        self.specs, self.widths, self.out = specs, widths, Path(out)
        self.device = torch.device(device)
        self.steps = first.tokens // first.batch_size
        self.run = {"format": RUN_FORMAT, "source": source or {},
                    "coders": [{"name": s.name, "hookpoint": s.hookpoint,
                                "out_hookpoint": s.out_hookpoint, "config": s.config.to_dict(),
                                "d_in": widths[s.hookpoint],
                                "d_out": widths[s.out_hookpoint or s.hookpoint]} for s in specs]}
        self.objective = objective
        if objective is not None:  # recorded only when set: local runs keep their run.json
            self.run["objective"] = objective.config.to_dict()
        self.parallel = parallel or Parallel.current()
        self.parallel.main_first(self._claim_folder, "claim the output folder")
        rows = None  # e2e under torchrun: a batch is `contexts` token contexts, split between ranks
        if objective is not None and self.parallel.world > 1:
            if objective.contexts < 1:
                raise ValueError("SplicedObjective(contexts=...) must give the contexts per batch "
                                 "when training runs on several ranks")
            rows = objective.contexts
        self.states = [self._build(s) for s in self.parallel.own(specs, widths, rows)]

    # ---- set-up ------------------------------------------------------------------------------

    def _claim_folder(self) -> None:
        path = self.out / "run.json"
        if path.exists():
            theirs = _with_new_defaults(read_json(path))
            if theirs != self.run:
                diff = _diff(theirs, self.run)
                raise ValueError(f"output folder {self.out} holds a different run ({diff}); choose "
                                 "another --out, or delete the folder to start over")
        elif self.out.exists() and any(self.out.iterdir()):
            raise ValueError(f"output folder {self.out} is not empty and holds no run.json; "
                             "choose an empty or new folder")
        else:
            atomic_write_json(path, self.run)

    def _build(self, spec: CoderSpec) -> _State:
        c = spec.config
        d_in = self.widths[spec.hookpoint]
        res = c.resolve(d_in)
        cfg = CoderConfig(d_in=d_in, n_features=res.n_features, kind=c.kind,
                          d_out=self.widths[spec.out_hookpoint] if spec.out_hookpoint else None,
                          activation=c.activation, k=c.k if c.activation in ("topk", "batchtopk") else None,
                          penalty=c.penalty, p=c.p, jumprelu_bandwidth=c.jumprelu_bandwidth,
                          jumprelu_init_threshold=c.jumprelu_init_threshold, hookpoint=spec.hookpoint,
                          out_hookpoint=spec.out_hookpoint)
        coder = build_coder(cfg, device=self.device)
        # fused: one pass over each parameter per step (6x faster than foreach on CPU); same algorithm
        opt = torch.optim.Adam(coder.parameters(), lr=res.lr, betas=(c.beta1, c.beta2), fused=True)
        return _State(spec, res, coder, opt, DeadTracker(res.n_features, res.dead_tokens))

    def _initialize(self, batch: dict[str, Tensor]) -> None:
        for st in self.states:
            c = st.spec.config
            x, y = self._xy(st, batch)
            norms = x.norm(dim=1)
            st.median_norm = float(norms.median())
            typ = (slice(None) if c.outlier_multiple <= 0 or st.median_norm <= 0
                   else norms <= c.outlier_multiple * st.median_norm)
            xt, yt = x[typ], y[typ]
            keep = self._keep(st, x)[0]
            if keep is not None:
                x, y = x[keep], y[keep]
            if c.normalize:
                # the scale comes from the typical tokens even when outliers are trained on: one
                # massive-activation token in the first batch would otherwise shrink it ~3x, and with
                # it every penalty coefficient's meaning (seen: L0 119 or 16 from one coef by seed)
                target = st.res.input_norm
                st.scale_in = math.sqrt((target ** 2 or xt.shape[1]) / float(xt.pow(2).sum(1).mean()))
                st.scale_out = (st.scale_in if c.kind == "sae"
                                else math.sqrt((target ** 2 or yt.shape[1])
                                               / float(yt.pow(2).sum(1).mean())))
            initialize(st.coder, x * st.scale_in, None if c.kind == "sae" else y * st.scale_out,
                       method=c.init, bias=c.bias_init, seed=c.seed, calibrate=st.res.calibrate_init,
                       encoder_norm=st.res.init_encoder_norm)

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self, batches: Batches, progress: bool = True) -> dict[str, SparseCoder]:
        from tqdm.auto import tqdm

        final = [self.out / s.name / "cfg.json" for s in self.specs]
        if all(p.exists() for p in final) and (self.out / "done").exists():
            log.info("%s already holds the finished run", self.out)
            return {s.name: SparseCoder.load(str(self.out / s.name)) for s in self.specs}
        start = self.parallel.start(self._resume(), self.states)
        main = self.parallel.is_main  # rank 0 alone logs and shows progress
        wandb = self._wandb() if main else None
        bar = tqdm(total=self.steps, initial=start, unit="step", desc="training",
                   disable=not (progress and main), dynamic_ncols=True)
        # in a torchrun run: this rank's rows of each batch. On an accelerator the next batch is
        # read in a thread during each step (the CPU is otherwise idle then). On the CPU the step
        # keeps every core busy, so reading ahead gained nothing and held a second batch: in the
        # [O1.3] benchmark 22.4k tokens/s either way, train RSS 1.42x the floor without it
        # against 1.50x with it (BENCHMARKS.md)
        it = iter(batches(start)) if self.device.type == "cpu" else prefetch(batches(start), depth=1)
        for step in range(start, self.steps):
            batch = self.parallel.exchange(next(it), step, to_owners=self.objective is None)
            clean = None if self.objective is None else self.objective.clean(batch, step)
            if clean is not None:  # token contexts -> the clean activations at the hookpoints
                batch = clean.acts
                if step == 0 or not clean.spliced:  # what initialisation and local steps read
                    batch = self.parallel.exchange_rows(batch, step)
            if step == 0:
                self.parallel.initialize(self._initialize, batch, self.states)
                release_free_memory()  # initialisation's temporaries
            if clean is not None and clean.spliced:
                self.objective.step(self, clean, step)
            else:
                for st in self.states:
                    self._step(st, batch, step)
            self.parallel.after_step(self.states)
            # the step's freed heap back to the OS: with the big buffers reused (Workspace), what a
            # step frees is a few MB of index arrays, which glibc would otherwise keep and
            # fragment (train RSS 1.46x the floor against 1.53x, at no measurable speed cost)
            release_free_memory()
            bar.update(1)
            if step % self.specs[0].config.log_every == 0 or step == self.steps - 1:
                metrics = self.parallel.metrics(self.specs, self.states)
                bar.set_postfix(_summary(metrics))
                if wandb is not None:
                    wandb.log({f"{name}/{k}": v for name, last in metrics.items()
                               for k, v in last.items()}, step=step)
            if (step + 1) % self.specs[0].config.checkpoint_every == 0 and step + 1 < self.steps:
                self.save_checkpoint(step + 1)
        if hasattr(it, "close"):  # a generator (the read-ahead's, or the caller's): finish it
            it.close()
        bar.close()
        if wandb is not None:
            wandb.finish()
        return self._finish()

    def _step(self, st: _State, batch: dict[str, Tensor], step: int) -> None:
        c, coder = st.spec.config, st.coder
        x, y = self._xy(st, batch)
        same = y is x
        # one compiled pass per tensor: finiteness, row norms (outliers), the variance's sums
        sx = _stats(x, rows=True)
        _check_finite(st.spec.hookpoint, x, step, sx)
        sy = sx if same else _stats(y, rows=False)
        if st.spec.out_hookpoint:
            _check_finite(st.spec.out_hookpoint, y, step, sy)
        keep, n_outliers = self._keep(st, x, None if sx is None else sx.row_sq)
        st.n_outliers += n_outliers
        if keep is not None:  # drop_outliers, and some were found
            x = x[keep]
            y = x if same else y[keep]
            sx = sy = None
        for g in st.opt.param_groups:
            g["lr"] = st.res.lr * lr_factor(step, self.steps, c.lr_warmup, c.lr_decay)
        p = c.p if c.p_end <= 0 else c.p + (c.p_end - c.p) * step / max(1, self.steps - 1)
        sparse_path = c.sparse_path and coder.has_sparse_path  # top-k family: coders/sparse.py
        dead = (st.dead.dead_mask.to(x.device) if coder.cfg.k is not None and c.auxk_coef > 0
                else None)
        use_auxk = dead is not None and bool(dead.any())
        # W_enc's and W_dec's Adam steps straight from the sparse factors, no [F, D] gradients
        # (train/sparse_adam.py); inside the backward unless AuxK adds its rows' gradients
        sink = (SparseAdamStep(st.opt, coder, st.constrained, exclusive=not use_auxk, workspace=st.workspace)
                if sparse_path and c.sparse_adam and SparseAdamStep.usable(st.opt, coder, st.res.grad_clip,
                                                         self.parallel.mode == "data") else None)
        # with the sink, the normalisation's scales ride on the encoder GEMMs (AuxK's too) and the
        # losses: no scaled copy of the batch. Otherwise the batch is scaled (an SAE's input and
        # target are one tensor: scaled once)
        fold = sink is not None and keep is None and step not in st.res.resample_steps
        if fold:
            scale_in, target_scale = st.scale_in, st.scale_out
        else:
            x_in = x * st.scale_in  # not in the workspace: this path is rare (resampling steps,
            # no kernels), and a buffer kept for it would stay through every step after
            y = x_in if same and st.scale_out == st.scale_in else y * st.scale_out
            x, scale_in, target_scale = x_in, 1.0, 1.0
        coder.weight_sink = sink
        try:
            if sparse_path:
                sparse = coder.forward_sparse(x, scale_in)
                pred, pre_acts, loss = sparse.out, None, 0.0
            else:
                out = coder(x, target=None if c.kind == "sae" else y)
                pred, pre_acts, loss, sparse = out.out, out.pre_acts, out.aux_loss, None
            # no [B, D] error made or kept; on the sparse path the gradient overwrites pred (only
            # the loss reads it: the decoder's backward does not)
            recon = squared_error(pred, y, overwrite=sparse_path, scale=target_scale) / max(1, y.shape[0])
            loss = recon + loss
            if sparse is None and c.coef > 0 and coder.cfg.resolved_penalty != "none":
                penalty = out.sparsity_loss if c.p_end <= 0 else coder.sparsity_penalty(out.acts, out.pre_acts, p)
                loss = loss + c.coef * ramp(step, self.steps, c.coef_warmup) * penalty
            if use_auxk:
                # the MSE over the residual's variance, weighed by that variance: the MSE itself
                loss = loss + c.auxk_coef * coder.auxk_loss(x, y, pre_acts, dead, st.res.k_aux, out=pred,
                                                            normalize=False, scale=scale_in,
                                                            target_scale=target_scale)
        finally:
            coder.weight_sink = None
        fvu_loss = st.res.recon_loss == "fvu"
        # this rank's rows' variance of the (scaled) target: from the batch's sums, or one pass
        local_total = (torch.tensor(sy.variance(y.shape[0], st.scale_out)) if sy is not None
                       else torch.var(y.detach(), dim=0, correction=0).sum() * target_scale ** 2 * y.shape[0])
        total = (self._global_variance(y * target_scale) if fvu_loss and self.parallel.mode == "data"
                 else local_total)
        if fvu_loss and total > 0:  # per token -> over the (global) batch's total variance
            loss = loss * (x.shape[0] / total)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"coder {st.spec.name}: the loss became {float(loss)} at step "
                                     f"{step}; lower --lr (now {st.res.lr:.3g}) or --coef. The last "
                                     "checkpoint is untouched.")
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        # data-parallel: the whole batch's gradient (an fvu loss is already a share of the global one)
        self.parallel.reduce_gradients(coder, None if fvu_loss else x.shape[0])
        grad_norm = st.optimizer_step(sink)
        if sparse is None:
            st.dead.update(out.acts.detach())
        else:
            st.dead.update_fired(sparse.active.fired(st.res.n_features), x.shape[0])
        if step in st.res.resample_steps:
            gen = torch.Generator().manual_seed(c.seed * 100003 + step)
            resample_dead(coder, st.opt, *self.parallel.gather_rows(x, y), st.dead.dead_mask, gen)
        with torch.no_grad():
            st.last = {"loss": float(loss), "fvu": float(recon * y.shape[0] / local_total),
                       "l0": (float((out.acts > 0).sum(-1).float().mean()) if sparse is None
                              else sparse.active.l0()),
                       "dead": st.dead.dead_fraction, "lr": st.opt.param_groups[0]["lr"]}
            if grad_norm is not None:
                st.last["grad_norm"] = grad_norm

    @torch.no_grad()
    def _global_variance(self, y: Tensor) -> Tensor:
        """Data-parallel: sum over the global batch of ||y - mean(y)||^2 (about the global mean),
        from every rank's sums, the same on every rank."""
        stats = torch.cat([y.sum(0, dtype=torch.float64), y.pow(2).sum(dtype=torch.float64)[None],
                           y.new_tensor([y.shape[0]], dtype=torch.float64)])
        stats = self.parallel.sum(stats, "summing the batch's variance")
        s, sq, n = stats[:-2], stats[-2], stats[-1].clamp_min(1)
        return (sq - s.pow(2).sum() / n).clamp_min(0).to(y.dtype)

    def _xy(self, st: _State, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x = batch[st.spec.hookpoint].to(self.device, torch.float32)
        y = batch[st.spec.out_hookpoint].to(self.device, torch.float32) if st.spec.out_hookpoint else x
        return x, y

    def _keep(self, st: _State, x: Tensor, row_sq: Tensor | None = None) -> tuple[Tensor | None, int]:
        """(the rows to train on, None for all of them; the number of outlier rows): outliers are
        always counted, and left out only with drop_outliers. `row_sq`: x's rows' sums of
        squares, when already known."""
        c = st.spec.config
        if c.outlier_multiple <= 0 or st.median_norm <= 0:
            return None, 0
        norms = x.norm(dim=1) if row_sq is None else row_sq.sqrt()
        outlier = norms > c.outlier_multiple * st.median_norm
        n = int(outlier.sum())
        return (~outlier if c.drop_outliers and n else None), n

    def _wandb(self):
        project = self.specs[0].config.wandb_project
        if not project:
            return None
        try:
            import wandb
        except ImportError as err:
            raise ImportError("W&B logging needs the extra: pip install 'monosemantic[wandb]'") from err
        return wandb.init(project=project, config=self.run, name=self.out.name)

    # ---- checkpoints and the end -------------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        self.parallel.sync(self.states)
        tensors: dict[str, Tensor] = {}
        state: dict = {"step": step, "coders": {}}
        for st in self.states:
            n = st.spec.name
            tensors.update({f"{n}/coder/{k}": v for k, v in st.coder.state_dict().items()})
            opt_t, opt_meta = pack_optimizer(n, st.opt)
            tensors.update(opt_t)
            tensors[f"{n}/since_fired"] = st.dead.since_fired
            state["coders"][n] = {"optim": opt_meta, "scale_in": st.scale_in,
                                  "scale_out": st.scale_out, "median_norm": st.median_norm,
                                  "n_outliers": st.n_outliers, "last": st.last}
        self.parallel.save_checkpoint(self.out / "checkpoint.safetensors", tensors, state)

    def _resume(self) -> int:
        path = self.out / "checkpoint.safetensors"
        if not path.exists():
            return 0
        tensors, state = load_checkpoint(path, [st.spec.name for st in self.states])
        for st in self.states:
            n = st.spec.name
            sd = {k[len(f"{n}/coder/"):]: v for k, v in tensors.items() if k.startswith(f"{n}/coder/")}
            try:
                st.coder.load_state_dict(sd)
            except RuntimeError as err:
                raise ValueError(f"checkpoint {path} does not fit coder {n} (was the hookpoint "
                                 f"width or n_features changed?): {str(err)[:300]}") from err
            meta = state["coders"][n]
            st.opt.load_state_dict(unpack_optimizer(n, tensors, meta["optim"]))
            st.dead.since_fired = tensors[f"{n}/since_fired"].clone()
            st.scale_in, st.scale_out = meta["scale_in"], meta["scale_out"]
            st.median_norm, st.n_outliers, st.last = meta["median_norm"], meta["n_outliers"], meta["last"]
        log.info("resuming %s from step %d", self.out, state["step"])
        return int(state["step"])

    def _finish(self) -> dict[str, SparseCoder]:
        self.parallel.sync(self.states)
        self.parallel.release(self.states)
        coders = {}
        for st in self.states:
            coder = st.coder
            if not st.constrained:
                coder.fold_decoder_norms()
            coder.fold_scale(st.scale_in, st.scale_out)
            coder.eval()
            coders[st.spec.name] = coder
            if not self.parallel.writes_coders:  # data-parallel: rank 0 writes
                continue
            coder.save(str(self.out / st.spec.name))
            atomic_write_json(self.out / st.spec.name / "training.json", {
                "steps": self.steps, "tokens": self.steps * st.spec.config.batch_size,
                "n_outliers": st.n_outliers, "outliers_dropped": st.spec.config.drop_outliers,
                "median_norm": st.median_norm,
                "outlier_multiple": st.spec.config.outlier_multiple,
                "outlier_rule": f"norm > {st.spec.config.outlier_multiple} x median norm "
                                f"({st.median_norm:.4g}) at the start of training, "
                                + ("left out of training" if st.spec.config.drop_outliers
                                   else "trained on"),
                "normalization": {"in_scale": st.scale_in, "out_scale": st.scale_out},
                "final": st.last, "lr": st.res.lr, "dead_tokens": st.res.dead_tokens,
                "grad_clip": st.res.grad_clip, "input_norm": st.res.input_norm or math.sqrt(st.coder.cfg.d_in),
                "calibrate_init": st.res.calibrate_init, "init_encoder_norm": st.res.init_encoder_norm,
                "recon_loss": st.res.recon_loss})
        self.parallel.finish(self.out)  # writes `done`, removes the checkpoint
        return coders


def _summary(metrics: dict[str, dict[str, float]]) -> dict[str, str]:
    n = len(metrics)
    mean = {k: sum(m.get(k, 0.0) for m in metrics.values()) / n for k in ("fvu", "l0", "dead")}
    return {"fvu": f"{mean['fvu']:.3f}", "l0": f"{mean['l0']:.1f}", "dead": f"{100 * mean['dead']:.1f}%"}


def _stats(x: Tensor, rows: bool) -> kernels.BatchStats | None:
    """kernels.batch_stats(x) where the compiled kernels can take x, else None."""
    if x.ndim != 2 or x.stride(1) != 1 or not kernels.usable_for(x):
        return None
    return kernels.batch_stats(x, rows=rows)


def _check_finite(hookpoint: str, x: Tensor, step: int, stats: kernels.BatchStats | None = None) -> None:
    if stats.finite if stats is not None else torch.isfinite(x.sum()):  # one read of x: inf or
        return                                   # nan anywhere makes the sums non-finite
    bad = ~torch.isfinite(x)
    if bad.any():
        row, dim = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"non-finite activation ({float(x[row, dim])}) at hookpoint {hookpoint}, "
                         f"step {step}, batch row {row}, dim {dim}; training stopped before any "
                         "weight was updated with it (the last checkpoint is intact). Check the "
                         "model dtype (use float32) and the activation cache.")


def _with_new_defaults(run: dict) -> dict:
    """A run.json written before a TrainConfig field existed lacks it; that run trained with the
    field's default (new fields default to the old behaviour), so fill it in before comparing."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    for coder in run.get("coders", []):
        if isinstance(coder.get("config"), dict):
            coder["config"] = {**{k: v for k, v in defaults.items() if k not in coder["config"]},
                               **coder["config"]}
    return run


def _diff(a: dict, b: dict, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (u, v) in enumerate(zip(a, b)):
            if u != v:
                return _diff(u, v, f"{prefix}{i}.")
    return f"{prefix.rstrip('.')}: was {a!r}, now {b!r}"
