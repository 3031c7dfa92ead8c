"""Training on several processes with torch.distributed, launched by torchrun.

`DistConfig.distribute` chooses how a run on N ranks splits a global batch of B rows:

data    Every rank holds every coder. Rank r takes rows `shard_rows(B, r, N)` of each batch and
        runs the usual step on them; after backward the gradients are summed across ranks,
        weighted by each rank's kept-token count (ranks drop different numbers of outlier tokens):
            grad = sum_r n_r grad_r / sum_r n_r,
        which is the gradient of one process on the whole batch because every loss term is a mean
        over tokens. Everything else stays identical on every rank:
          - the first batch (median norm of the outlier rule, normalisation, initialisation) is
            gathered whole on every rank, and rank 0's initial state is broadcast;
          - dead-feature counters add the ranks' token counts and OR their fired masks;
          - resampling draws from the whole batch (its rows gathered on every rank);
          - BatchTopK selects the top k B of the whole batch, exactly: inside the selection each
            rank contributes its largest k B candidates, every rank takes the same global
            threshold from their union (`batch_threshold`), and widens its candidates when any
            rank must; its inference threshold then takes the minimum across ranks: each rank
            moved it to m t + (1 - m) low_r, and the minimum of those is m t + (1 - m) min_r low_r,
            the move with the smallest kept activation of all ranks;
          - outlier counts are summed and the last metrics averaged before each checkpoint.
layers  Each rank owns a subset of the coders (`assign_owners`: greedy by parameter count, so any
        number of coders of any widths on any number of ranks; a rank may own none). Every rank
        still produces its own rows `shard_rows(B, r, N)` of every hookpoint (its share of the
        cache, or its own model forward), and `exchange` sends each owner the rows of the
        hookpoints its coders read (point-to-point sends: gloo's all_to_all needs equal sizes),
        concatenated in rank order, so every coder sees the global batch exactly as one process
        would and trains to the same bits. `return_rows` is the way back, from owners to the ranks
        that produced the rows.
        With the end-to-end loss (train/e2e.py) the same happens inside the spliced forward pass:
        at each coder's hookpoint every rank sends its rows to the owner (`gather_to`), the owner
        runs the coder on the global batch and sends each rank its reconstruction back
        (`scatter_from`); in the backward pass d loss / d reconstruction travels to the owner the
        same way, the owner backpropagates through its coder, and d loss / d input returns.

Checkpoints hold coder state keyed by coder name, never by rank, so a run resumes on any number of
ranks in either mode. Rank 0 writes `checkpoint.safetensors`; in layers mode every other rank that
owns coders first writes `checkpoint.part-r<rank>-s<step>.safetensors`, and rank 0's file, written
after all parts exist, names them: it is the commit point. Final coders are written by rank 0 (data)
or by their owners (layers); `done` by rank 0 after every rank has finished.

Failures: every collective runs under the process group's timeout (`dist_timeout`). A peer that
died (its sockets close) or stalled makes the others raise `DistributedError`, naming the rank, the
step and what was being exchanged, instead of hanging. Checkpoints are written only at steps every
rank reached, so the last one is intact.

Backends: `init_distributed` picks NCCL when CUDA is available and gloo otherwise; tensors travel
on the backend's device. Nothing else depends on the choice.

Shapes: B rows per global batch, N ranks, D hookpoint width, F features.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoint import save_checkpoint
from .transport import RowTransport, shard_rows  # noqa: F401 (shard_rows is part of this API)

log = logging.getLogger(__name__)

MODES = ("data", "layers")
METRICS = ("loss", "fvu", "l0", "dead", "lr")
"""The per-coder metrics the progress bar and W&B show, gathered from every rank."""
PATIENT = timedelta(days=7)
"""How long ranks wait for rank 0 to finish one-off work (building the activation cache)."""


@dataclass(frozen=True)
class DistConfig:
    """How a run launched with torchrun splits its work (ignored in a single process)."""

    distribute: str = "data"
    """data: every rank trains every coder on its share of each batch, gradients all-reduced;
    layers: each rank owns some of the coders and receives every row of the hookpoints they read
    (for many hookpoints, or coders too large to replicate)."""
    dist_timeout: float = 600.0
    """Seconds a rank waits in a collective before failing with an error (a dead or stalled peer)."""

    def __post_init__(self):
        if self.distribute not in MODES:
            raise ValueError(f"distribute={self.distribute!r}: use one of {', '.join(MODES)}")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout={self.dist_timeout} must be > 0 seconds")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, stalled past the timeout, or failed first."""


def assign_owners(costs: list[int], world: int) -> list[int]:
    """The rank owning each of len(costs) items: largest first to the least-loaded rank (ties to
    the lower rank), so loads differ by at most the largest item. Deterministic."""
    loads, owner = [0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda q: (loads[q], q))
        owner[i], loads[r] = r, loads[r] + costs[i]
    return owner


def shard_batches(batches: Callable[[int], Iterator[dict[str, Tensor]]], rank: int, world: int
                  ) -> Callable[[int], Iterator[dict[str, Tensor]]]:
    """Wrap a source of whole batches so that it yields this rank's rows only (sources that can
    read a part directly, like `ActivationCache.batches(rank=, world_size=)`, should)."""
    def from_step(start: int) -> Iterator[dict[str, Tensor]]:
        for batch in batches(start):
            yield {h: t[slice(*shard_rows(t.shape[0], rank, world))] for h, t in batch.items()}
    return from_step


def init_distributed(config: DistConfig | None = None) -> "Parallel":
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...) and return this rank's `Parallel`; a single process when WORLD_SIZE is unset
    or 1. NCCL (one GPU per rank, LOCAL_RANK) when CUDA is available, gloo otherwise."""
    config = config or DistConfig()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Parallel(config=config)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=config.dist_timeout))
    return Parallel.current(config)


class Parallel(RowTransport):
    """This process's place in a run (rank, world, mode) and the collectives the trainer calls.
    With world 1 every method does nothing (returns its input)."""

    def __init__(self, rank: int = 0, world: int = 1, config: DistConfig | None = None):
        self.rank, self.world, self.config = rank, world, config or DistConfig()
        self.mode = self.config.distribute if world > 1 else "single"
        backend = dist.get_backend() if world > 1 else "gloo"
        self.device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                       else torch.device("cpu"))
        self.step = -1
        self.owner: dict[str, int] = {}
        self.needs: list[list[str]] = [[] for _ in range(world)]
        self.widths: dict[str, int] = {}
        self.batch_size = 0
        self._outliers: dict[str, int] = {}
        self._patient = None
        self.comm_seconds = 0.0
        """Wall time spent in collectives so far (waiting for slower ranks included)."""
        self.timeout = _group_timeout() if world > 1 else None
        """Seconds a collective waits: the process group's own timeout (the config's when
        init_distributed made the group)."""
        if self.timeout is None:
            self.timeout = self.config.dist_timeout

    @classmethod
    def current(cls, config: DistConfig | None = None) -> "Parallel":
        """From the default process group if one is initialised (torchrun), else one process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size(), config)
        return cls(config=config)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes_coders(self) -> bool:
        """Whether this rank saves the coders it holds (data: only rank 0; layers: every owner)."""
        return self.mode == "layers" or self.is_main

    def __repr__(self) -> str:
        return f"Parallel(rank={self.rank}, world={self.world}, mode={self.mode!r})"

    # ---- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _collective(self, what: str):
        start = time.perf_counter()
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as err:  # torch.distributed's errors (DistError) are RuntimeErrors
            raise DistributedError(
                f"rank {self.rank} of {self.world}, step {self.step}: {what} failed: another rank "
                f"died, failed, or did not answer within {self.timeout:g} s ({err}). "
                "The last checkpoint is intact: run the same command again, on any number of "
                "ranks, to resume.") from err
        finally:
            self.comm_seconds += time.perf_counter() - start

    def _all_reduce(self, t: Tensor, op, what: str) -> Tensor:
        buf = t.to(self.device)
        with self._collective(what):
            dist.all_reduce(buf, op=op)
        return buf.to(t.device)

    def _gather_rows(self, t: Tensor, counts: list[int], what: str) -> Tensor:
        """Concatenate every rank's [counts[r], ...] tensor in rank order, on every rank."""
        most = max(counts)
        buf = t.to(self.device).new_zeros((most, *t.shape[1:]))
        buf[:t.shape[0]] = t.to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        with self._collective(what):
            dist.all_gather(parts, buf)
        return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(t.device)

    def main_first(self, fn: Callable[[], object], what: str, patient: bool = False):
        """Run fn on rank 0, then on the other ranks; if it raised on rank 0 the others raise too
        instead of waiting. `patient` waits up to a week (for one-off work such as building the
        activation cache) rather than the collective timeout."""
        if self.world == 1:
            return fn()
        group = None
        if patient:
            if self._patient is None:  # every rank reaches this line in the same order
                with self._collective("creating a gloo group for long waits"):
                    self._patient = dist.new_group(backend="gloo", timeout=PATIENT)
            group = self._patient
        device = torch.device("cpu") if patient else self.device
        message = torch.zeros(1024, dtype=torch.uint8, device=device)
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # passed on to the other ranks, then re-raised here
                error = err
                text = f"{type(err).__name__}: {err}".encode()[:1023] or b"?"
                message[:len(text)] = torch.tensor(list(text), dtype=torch.uint8)
        with self._collective(f"waiting for rank 0 to {what}"):
            dist.broadcast(message, 0, group=group)
        if error is not None:
            raise error
        if message.any():
            text = bytes(message[message > 0].cpu().tolist()).decode(errors="replace")
            raise DistributedError(f"rank 0 failed to {what}: {text}")
        return result if self.is_main else fn()

    def barrier(self, what: str) -> None:
        if self.world > 1:
            self._all_reduce(torch.zeros(1), dist.ReduceOp.SUM, what)

    # ---- set-up --------------------------------------------------------------------------------

    def own(self, specs: list, widths: dict[str, int], rows: int | None = None) -> list:
        """The coder specs this rank trains: all of them, or in layers mode its share. `rows`:
        the rows of a global batch (default the coders' batch_size; token contexts for e2e)."""
        self.batch_size = specs[0].config.batch_size
        self.widths = dict(widths)
        if rows is not None:
            self.batch_size = rows
        if self.mode != "layers":
            self.owner = {s.name: 0 for s in specs}
            return list(specs)
        costs = []
        for s in specs:
            d_in, d_out = widths[s.hookpoint], widths[s.out_hookpoint or s.hookpoint]
            costs.append(s.config.resolve(d_in).n_features * (d_in + d_out))
        ranks = assign_owners(costs, self.world)
        self.owner = {s.name: r for s, r in zip(specs, ranks)}
        for s, r in zip(specs, ranks):
            for h in (s.hookpoint, s.out_hookpoint):
                if h and h not in self.needs[r]:
                    self.needs[r].append(h)
        mine = [s for s, r in zip(specs, ranks) if r == self.rank]
        if self.is_main:
            idle = [r for r in range(self.world) if r not in ranks]
            log.info("layers mode: %d coders on %d ranks%s", len(specs), self.world,
                     f" (ranks {idle} own none: use fewer ranks)" if idle else "")
        log.debug("rank %d owns %s", self.rank, [s.name for s in mine])
        return mine

    def start(self, step: int, states: list) -> int:
        """Check every rank resumes from the same step and hook the per-step reductions in."""
        self.step = step
        if self.world > 1:
            t = self._all_reduce(torch.tensor([step, -step], dtype=torch.int64),
                                 dist.ReduceOp.MIN, "agreeing on the step to resume from")
            if int(t[0]) != -int(t[1]):
                raise ValueError(f"the ranks found checkpoints at different steps ({int(t[0])} to "
                                 f"{-int(t[1])}): the output folder must be one folder that every "
                                 "rank sees (a shared filesystem)")
        self._outliers = {st.spec.name: st.n_outliers for st in states}
        if self.mode == "data":
            for st in states:
                st.dead.reduce = self._reduce_fired
                if hasattr(st.coder, "batch_reduce"):  # BatchTopK: select over the whole batch
                    st.coder.batch_reduce = self.batch_threshold
        return step

    @staticmethod
    def release(states: list) -> None:
        """Detach the coders from the process group (at the end of training)."""
        for st in states:
            st.dead.reduce = None
            if hasattr(st.coder, "batch_reduce"):
                st.coder.batch_reduce = None

    def initialize(self, init: Callable[[dict[str, Tensor]], None], batch: dict[str, Tensor],
                   states: list) -> None:
        """Initialise from the first batch: in data mode the whole batch is gathered on every
        rank and rank 0's result broadcast, so all ranks start identical."""
        if self.mode != "data":
            return init(batch)
        counts = self.row_counts(next(iter(batch.values())).shape[0])
        held = [(st.coder, st.coder.batch_reduce) for st in states
                if hasattr(st.coder, "batch_reduce")]
        for coder, _ in held:  # every rank initialises on the whole batch: no cross-rank selection
            coder.batch_reduce = None
        try:
            init({h: self._gather_rows(t, counts, "gathering the first batch")
                  for h, t in batch.items()})
        finally:
            for coder, reduce in held:
                coder.batch_reduce = reduce
        with self._collective("broadcasting the initial coders"):
            for st in states:
                for t in st.coder.state_dict().values():
                    buf = t.to(self.device)
                    dist.broadcast(buf, 0)
                    t.copy_(buf)
                scalars = torch.tensor([st.scale_in, st.scale_out, st.median_norm],
                                       dtype=torch.float64, device=self.device)
                dist.broadcast(scalars, 0)
                st.scale_in, st.scale_out, st.median_norm = scalars.tolist()

    # ---- every step ----------------------------------------------------------------------------

    def sum(self, t: Tensor, what: str) -> Tensor:
        """The sum of t over ranks, on every rank."""
        return t if self.world == 1 else self._all_reduce(t, dist.ReduceOp.SUM, what)

    def batch_threshold(self, candidates: Tensor, k: int, check: bool) -> tuple[Tensor, bool]:
        """BatchTopK over the whole batch (coders/sparse.BatchTopKSelection): this rank's ReLU'd
        candidates [B_r, c] -> (tau, widen), the same on every rank. tau is the (k B)-th largest of
        the union of every rank's k B largest candidates (B = sum_r B_r), which is the k B-th
        largest of the whole batch's candidates; widen says some rank's row may hold a selected
        value outside its candidates (its c-th candidate is positive and >= tau)."""
        total = k * sum(self.row_counts(candidates.shape[0]))
        flat = candidates.detach().flatten().float()
        top = flat.topk(total, sorted=False).values if flat.numel() > total else flat
        buf = torch.full((total,), -1.0, device=self.device)
        buf[:top.numel()] = top.to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        with self._collective("selecting BatchTopK's batch-wide top k"):
            dist.all_gather(parts, buf)
        union = torch.cat(parts)
        tau = union.topk(min(total, union.numel()), sorted=False).values.min().clamp_min(0)
        tau = tau.to(candidates.device, candidates.dtype)
        last = candidates[:, -1]
        widen = torch.tensor([float(check and bool(((last > 0) & (last >= tau)).any()))])
        widen = self._all_reduce(widen, dist.ReduceOp.MAX, "agreeing on BatchTopK's candidates")
        return tau, bool(widen.item() > 0)

    def reduce_gradients(self, coder: torch.nn.Module, n_tokens: int | None = None) -> None:
        """Data mode, after backward: every rank's gradients become sum_r n_r g_r / sum_r n_r
        (n_r = the tokens rank r kept), in one all-reduce per coder; with n_tokens None, their
        plain sum (for losses each rank already weighted by its share of the global batch)."""
        if self.mode != "data":
            return
        params = [p for p in coder.parameters() if p.requires_grad]
        weight = 1 if n_tokens is None else n_tokens
        flat = [p.grad.reshape(-1) * weight if p.grad is not None else p.new_zeros(p.numel())
                for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params] + [float(weight)],
                           device=params[0].device)
        buf = self._all_reduce(torch.cat(flat + [has]), dist.ReduceOp.SUM, "all-reducing gradients")
        total = float(buf[-1])
        flags = buf[-1 - len(params):-1]
        offset = 0
        for p, flag in zip(params, flags.tolist()):
            n = p.numel()
            if flag > 0:
                grad = buf[offset:offset + n]
                if n_tokens is not None:
                    grad = grad / max(total, 1.0)
                p.grad = grad.view_as(p).to(p.dtype)
            offset += n

    def _reduce_fired(self, fired: Tensor, n_tokens: int) -> tuple[Tensor, int]:
        count = torch.tensor([n_tokens], dtype=torch.int64, device=fired.device)
        buf = torch.cat([fired.to(torch.int64), count])
        buf = self._all_reduce(buf, dist.ReduceOp.SUM, "reducing dead-feature counters")
        return (buf[:-1] > 0).to(fired.device), int(buf[-1])

    def gather_rows(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Data mode: the whole batch's kept rows of x and y (in rank order), on every rank."""
        if self.mode != "data":
            return x, y
        counts = self._all_reduce(torch.nn.functional.one_hot(
            torch.tensor(self.rank), self.world) * x.shape[0], dist.ReduceOp.SUM,
            "gathering row counts").tolist()
        gx = self._gather_rows(x.detach(), counts, "gathering the batch for resampling")
        gy = gx if y is x else self._gather_rows(y.detach(), counts, "gathering the batch for resampling")
        return gx, gy

    def after_step(self, states: list) -> None:
        """Data mode: make state that the forward pass updates identical on every rank
        (BatchTopK's threshold: the minimum over ranks)."""
        if self.mode != "data":
            return
        held = [st.coder.threshold for st in states
                if st.coder.cfg.activation == "batchtopk" and hasattr(st.coder, "threshold")]
        if held:
            low = self._all_reduce(torch.stack([t.detach().float() for t in held]),
                                   dist.ReduceOp.MIN, "reducing BatchTopK thresholds")
            with torch.no_grad():
                for t, v in zip(held, low):
                    t.copy_(v)

    # ---- metrics, checkpoints, the end ---------------------------------------------------------

    def metrics(self, specs: list, states: list) -> dict[str, dict[str, float]]:
        """Every coder's last metrics, on every rank (data: averaged over ranks; layers: from
        each coder's owner)."""
        if self.world == 1:
            return {st.spec.name: dict(st.last) for st in states}
        index = {s.name: i for i, s in enumerate(specs)}
        table = torch.zeros(len(specs), len(METRICS), dtype=torch.float64)
        for st in states:
            table[index[st.spec.name]] = torch.tensor([float(st.last.get(k, 0.0)) for k in METRICS],
                                                      dtype=torch.float64)
        table = self._all_reduce(table, dist.ReduceOp.SUM, "gathering metrics")
        if self.mode == "data":
            table /= self.world
        return {s.name: dict(zip(METRICS, table[index[s.name]].tolist())) for s in specs}

    def sync(self, states: list) -> None:
        """Data mode, before a checkpoint or the end: sum the outlier counts (each rank counted its
        own rows since the last sync) and average the last metrics over ranks."""
        if self.mode != "data":
            return
        keys = [sorted(k for k, v in st.last.items() if isinstance(v, (int, float))) for st in states]
        rows = [[float(st.n_outliers - self._outliers.get(st.spec.name, 0))]
                + [float(st.last[k]) for k in ks] for st, ks in zip(states, keys)]
        flat = torch.tensor([v for r in rows for v in r], dtype=torch.float64)
        flat = self._all_reduce(flat, dist.ReduceOp.SUM, "summing outlier counts")
        offset = 0
        for st, ks in zip(states, keys):
            st.n_outliers = self._outliers.get(st.spec.name, 0) + int(round(float(flat[offset])))
            self._outliers[st.spec.name] = st.n_outliers
            for i, k in enumerate(ks):
                st.last[k] = float(flat[offset + 1 + i]) / self.world
            offset += 1 + len(ks)

    def save_checkpoint(self, path: Path, tensors: dict[str, Tensor], state: dict) -> None:
        """Write this rank's share of a checkpoint (see the module docstring)."""
        if self.mode != "layers":
            if self.is_main:
                save_checkpoint(path, tensors, state)
            return
        step = int(state["step"])
        if not self.is_main and tensors:
            save_checkpoint(path.parent / _part_name(path, self.rank, step), tensors, state)
        self.barrier("waiting for every rank's checkpoint part")
        if self.is_main:
            owners = sorted(set(self.owner.values()) - {0})
            parts = [_part_name(path, r, step) for r in owners]
            save_checkpoint(path, tensors, {**state, "parts": parts})
            for stale in path.parent.glob(f"{path.stem}.part-*.safetensors"):
                if stale.name not in parts:
                    stale.unlink()

    def finish(self, out: Path) -> None:
        """After every rank saved its coders: rank 0 marks the run done and removes checkpoints."""
        self.barrier("waiting for every rank to save its coders")
        if self.is_main:
            (out / "done").write_text("finished\n")
            for path in [out / "checkpoint.safetensors", *out.glob("checkpoint.part-*.safetensors")]:
                if path.exists():
                    path.unlink()


def _group_timeout() -> float | None:
    """The default process group's timeout in seconds, or None where this torch does not say
    (it is only reachable through a private attribute)."""
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        return backend.options._timeout.total_seconds()
    except Exception:  # a private API: any failure just means "unknown"
        return None


def _part_name(path: Path, rank: int, step: int) -> str:
    return f"{path.stem}.part-r{rank}-s{step}.safetensors"
