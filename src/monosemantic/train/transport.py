"""How rows of a batch travel between ranks: `RowTransport`, the half of `Parallel`
(train/distributed.py) that moves activations, reconstructions and gradients.

Every rank holds its own rows of each global batch of B rows (`shard_rows`: contiguous, in rank
order). In layers mode `exchange` sends each coder's owner the rows of the hookpoints it reads
(point-to-point: gloo's all_to_all needs equal sizes) and `return_rows` is the way back;
`exchange_rows` does the same for row counts that differ between ranks (the kept positions of
token contexts in e2e training). `gather_to` and `scatter_from` move one tensor's rows to one
owner and back, inside the spliced forward and backward passes of e2e training in layers mode.

The methods use what `Parallel` sets up: rank, world, mode, device, batch_size, needs, widths,
step, and its `_collective` / `_all_reduce` wrappers (errors name the rank, the step and what was
being exchanged).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of a batch of n rows that `rank` of `world` reads (contiguous, in rank order,
    sizes differing by at most one)."""
    return n * rank // world, n * (rank + 1) // world


class RowTransport:
    """Moving rows between ranks (mixed into `Parallel`)."""

    def exchange(self, batch: dict[str, Tensor], step: int, to_owners: bool = True
                 ) -> dict[str, Tensor]:
        """This rank's rows of a batch -> what its coders train on: its rows (data mode), or the
        global batch of the hookpoints its coders read (layers mode; `to_owners` False only checks
        the rows, for batches of token contexts)."""
        self.step = step
        if self.world == 1:
            return batch
        lo, hi = shard_rows(self.batch_size, self.rank, self.world)
        for h, t in batch.items():
            if t.shape[0] != hi - lo:
                raise ValueError(
                    f"rank {self.rank} got {t.shape[0]} rows of {h} at step {step}; on {self.world} "
                    f"ranks each reads its share of every batch of {self.batch_size} rows (rows "
                    f"{lo}:{hi} here). Read a part (ActivationCache.batches(rank=, world_size=)) "
                    "or wrap a source of whole batches with shard_batches")
        if self.mode == "data" or not to_owners:
            return batch
        return self._to_owners(batch)

    def exchange_rows(self, rows: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Like `exchange` for hookpoint rows whose count differs between ranks (the kept
        positions of each rank's token contexts, in e2e training)."""
        self.step = step
        if self.mode != "layers":
            return rows
        return self._to_owners(rows, self.row_counts(next(iter(rows.values())).shape[0]))

    def row_counts(self, n: int) -> list[int]:
        """Every rank's n, in rank order (one small all-reduce)."""
        if self.world == 1:
            return [n]
        onehot = torch.zeros(self.world, dtype=torch.int64)
        onehot[self.rank] = n
        return self._all_reduce(onehot, dist.ReduceOp.SUM, "exchanging row counts").tolist()

    def _rows(self, rank: int) -> int:
        lo, hi = shard_rows(self.batch_size, rank, self.world)
        return hi - lo

    def _to_owners(self, batch: dict[str, Tensor], counts: list[int] | None = None
                   ) -> dict[str, Tensor]:
        rows = counts or [self._rows(p) for p in range(self.world)]
        mine = self.needs[self.rank]
        missing = [h for q in range(self.world) for h in self.needs[q] if h not in batch]
        if missing:
            raise ValueError(f"the batch lacks hookpoints {sorted(set(missing))} that coders read")
        ops, received = [], {}
        for q in range(self.world):
            if self.needs[q] and q != self.rank:
                payload = torch.cat([batch[h].to(self.device, torch.float32).reshape(-1)
                                     for h in self.needs[q]])
                ops.append(dist.P2POp(dist.isend, payload, q))
        for p in range(self.world):
            if p == self.rank:
                received[p] = {h: batch[h].to(self.device, torch.float32) for h in mine}
            elif mine:
                buf = torch.empty(rows[p] * sum(self.widths[h] for h in mine), device=self.device)
                received[p] = buf
                ops.append(dist.P2POp(dist.irecv, buf, p))
        if ops:
            with self._collective("sending activations to the coders' owners"):
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
        out = {}
        for h in mine:
            parts = []
            for p in range(self.world):
                if p == self.rank:
                    parts.append(received[p][h])
                    continue
                off = sum(rows[p] * self.widths[g] for g in mine[:mine.index(h)])
                n = rows[p] * self.widths[h]
                parts.append(received[p][off:off + n].view(rows[p], self.widths[h]))
            out[h] = torch.cat(parts)
        return out

    def return_rows(self, values: dict[str, Tensor], owner: dict[str, int],
                    widths: dict[str, int]) -> dict[str, Tensor]:
        """The inverse of `exchange`: `owner[k]` holds values[k] [B, widths[k]] for the global
        batch; every rank gets back its own rows of every k (for the end-to-end loss, issue 5)."""
        if self.world == 1:
            return dict(values)
        lo, hi = shard_rows(self.batch_size, self.rank, self.world)
        keys = sorted(owner)
        ops, out = [], {}
        for k in keys:
            if owner[k] == self.rank:
                for q in range(self.world):
                    rows = values[k][slice(*shard_rows(self.batch_size, q, self.world))]
                    if q == self.rank:
                        out[k] = rows.clone()
                    else:
                        ops.append(dist.P2POp(dist.isend, rows.to(self.device).contiguous(), q))
            else:
                out[k] = torch.empty(hi - lo, widths[k], device=self.device)
                ops.append(dist.P2POp(dist.irecv, out[k], owner[k]))
        if ops:
            with self._collective("returning rows to the ranks that produced them"):
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
        return out

    def gather_to(self, owner: int, t: Tensor, counts: list[int], what: str) -> Tensor | None:
        """Every rank's t [counts[r], W], concatenated in rank order on `owner` (None elsewhere)."""
        if self.world == 1:
            return t
        ops, parts = [], []
        if self.rank == owner:
            for p, n in enumerate(counts):
                if p == self.rank:
                    parts.append(t.to(self.device))
                    continue
                parts.append(torch.empty(n, *t.shape[1:], dtype=t.dtype, device=self.device))
                if n:
                    ops.append(dist.P2POp(dist.irecv, parts[-1], p))
        elif counts[self.rank]:
            ops.append(dist.P2POp(dist.isend, t.to(self.device).contiguous(), owner))
        self._run(ops, what)
        return torch.cat(parts).to(t.device) if self.rank == owner else None

    def scatter_from(self, owner: int, t: Tensor | None, counts: list[int], width: int,
                     what: str, like: Tensor) -> Tensor:
        """The inverse of `gather_to`: `owner` holds t [sum(counts), W]; each rank gets its
        counts[rank] rows (dtype and device of `like`)."""
        if self.world == 1:
            return t
        ops, offsets = [], [0]
        for n in counts:
            offsets.append(offsets[-1] + n)
        if self.rank == owner:
            for q in range(self.world):
                if q != self.rank and counts[q]:
                    part = t[offsets[q]:offsets[q + 1]].to(self.device).contiguous()
                    ops.append(dist.P2POp(dist.isend, part, q))
            self._run(ops, what)
            return t[offsets[self.rank]:offsets[self.rank + 1]].to(like.device).clone()
        out = torch.empty(counts[self.rank], width, dtype=like.dtype, device=self.device)
        if counts[self.rank]:
            ops.append(dist.P2POp(dist.irecv, out, owner))
        self._run(ops, what)
        return out.to(like.device)

    def _run(self, ops: list, what: str) -> None:
        if ops:
            with self._collective(what):
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
