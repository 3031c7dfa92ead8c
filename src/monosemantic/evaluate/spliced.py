"""Evaluate coders in place: reconstruction metrics and the spliced model's next-token loss.

For each batch of held-out contexts:
  1. one clean forward pass gives the clean logits and every hookpoint the coders read or write;
  2. reconstruction statistics (FVU, L0, shrinkage, density, ...) accumulate exactly over the set
     (`metrics.ReconstructionStats`), outlier tokens (norm > outlier_multiple x the median norm
     recorded in training) flagged and also reported separately;
  3. per coder, a forward pass with the coder's output spliced in at its (output) hookpoint, and
     per output hookpoint one with it zero-ablated (shared by the coders writing there), give CE
     loss and KL(clean || spliced).
Splicing rule: only kept positions are replaced (special tokens such as BOS, excluded from
training because of their outlier norms, keep their clean activation), and the same positions
are zeroed for the zero-ablation baseline. CE and KL count every position whose own token is kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..coders import SparseCoder
from ..data.activations import batched_contexts, cpu_streams, in_cpu_streams
from ..data.tokens import keep_mask
from ..hooks import capture, patch
from ..metrics import (DimensionShare, ReconstructionMetrics, ReconstructionStats, SumCount, ce_loss_recovered,
                       kl_divergence, next_token_ce)


@dataclass
class CoderEval:
    """Everything measured for one coder on one evaluation set."""

    recon: ReconstructionMetrics
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_loss_recovered: float
    ce_increase: float
    kl: float
    kl_zero: float
    n_tokens: int
    outlier_rule: str
    top_dims: list[DimensionShare]
    """The output dimensions carrying the most variance, with each one's own FVU: on residual
    streams one dimension can carry a large share of the variance, and the FVU over all
    dimensions should not hide how it is reconstructed."""

    def scalars(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("recon", "top_dims")}
        out.update(self.recon.scalars())
        out["top_dims"] = [d._asdict() for d in self.top_dims]
        return out


def _hookpoints(coder: SparseCoder) -> tuple[str, str]:
    cfg = coder.cfg
    if not cfg.hookpoint:
        raise ValueError("the coder's cfg.hookpoint is empty: evaluation needs to know where it reads")
    return cfg.hookpoint, cfg.out_hookpoint or cfg.hookpoint


def _splice(coder: SparseCoder, mask: Tensor, store: dict, mode: str):
    """Hook functions that splice (mode 'coder') or zero (mode 'zero') at the output hookpoint."""
    hp_in, hp_out = _hookpoints(coder)

    def read_input(t: Tensor) -> None:
        store["x"] = t

    def write_output(t: Tensor) -> Tensor:
        m = mask.to(t.device)[..., None]
        if mode == "zero":
            return torch.where(m, torch.zeros_like(t), t)
        x = store.get("x", t)
        new = coder(x.reshape(-1, x.shape[-1]).to(coder.dtype)).out.reshape(*t.shape[:-1], -1)
        return torch.where(m, new.to(t.dtype), t)

    return {hp_out: write_output} if hp_in == hp_out else {hp_in: read_input, hp_out: write_output}


def _losses(model, coders: dict[str, SparseCoder], tokens: Tensor, mask: Tensor, needed: list[str],
            spliced: bool) -> tuple[dict[str, Tensor], dict[str, dict[str, SumCount]]]:
    """One group of contexts: the hookpoints the coders read and write (clean forward) and each
    coder's CE and KL sums (clean; spliced and zero-ablated unless `spliced` is False). No grad
    (set here: a stream thread has its own grad mode)."""
    with torch.no_grad():
        with capture(model, needed) as acts:
            clean = model(input_ids=tokens, use_cache=False).logits
        ce_clean = next_token_ce(clean, tokens, mask)
        losses: dict[str, dict[str, SumCount]] = {}
        zeroed = {}  # output hookpoint -> (CE, KL) of its zero ablation: one forward per hookpoint
        for name, coder in coders.items():
            c = losses[name] = {"clean": ce_clean}
            if not spliced:
                continue
            hp_out = _hookpoints(coder)[1]
            with patch(model, _splice(coder, mask, {}, "coder")):
                logits = model(input_ids=tokens, use_cache=False).logits
            c["spliced"] = next_token_ce(logits, tokens, mask)
            c["kl"] = kl_divergence(clean, logits, mask)
            del logits
            if hp_out not in zeroed:  # the same for every coder writing there
                with patch(model, _splice(coder, mask, {}, "zero")):
                    logits = model(input_ids=tokens, use_cache=False).logits
                zeroed[hp_out] = (next_token_ce(logits, tokens, mask),
                                  kl_divergence(clean, logits, mask))
                del logits
            c["zero"], c["kl_zero"] = zeroed[hp_out]
    return acts, losses


@torch.no_grad()
def evaluate_coders(lm, coders: dict[str, SparseCoder], documents: list[str], n_tokens: int,
                    ctx_len: int = 256, batch_size: int = 8, exclude_ids: list[int] | None = None,
                    outlier_norms: dict[str, float] | None = None, spliced: bool = True,
                    progress: bool = True) -> dict[str, CoderEval]:
    """Evaluate each coder on `n_tokens` tokens of `documents` (held out from training): whole
    batches of contexts run through the model, and of the last one only the first kept tokens
    that complete the count are scored (fewer when the documents run out).

    `outlier_norms[name]` is the norm above which a token counts as an outlier for that coder.
    """
    from tqdm.auto import tqdm

    exclude_ids = list(exclude_ids or [])
    for coder in coders.values():  # inference mode: batchtopk uses its threshold, and keeps it
        coder.eval()
    model = lm.model
    outlier_norms = outlier_norms or {}
    stats = {n: ReconstructionStats() for n in coders}
    ce = {n: {"clean": SumCount(0.0, 0), "spliced": SumCount(0.0, 0), "zero": SumCount(0.0, 0),
              "kl": SumCount(0.0, 0), "kl_zero": SumCount(0.0, 0)} for n in coders}
    needed = sorted({h for c in coders.values() for h in _hookpoints(c)})
    device = next(model.parameters()).device
    seen = 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="evaluating", disable=not progress)
    for _, tokens in batched_contexts(lm.tokenizer, documents, ctx_len, lm.bos_token_id, batch_size):
        tokens = tokens.to(device)
        mask = keep_mask(tokens.cpu(), exclude_ids)
        room = n_tokens - seen
        if int(mask.sum()) > room:  # the last batch: its first `room` kept tokens complete the count
            flat = mask.flatten()
            flat[flat.nonzero(as_tuple=True)[0][room:]] = False
            mask = flat.view_as(mask)
        mask = mask.to(device)
        # on the CPU, side-by-side streams of contexts (data.activations.cpu_streams)
        streams = cpu_streams(len(tokens)) if device.type == "cpu" else 1
        groups = list(zip(torch.tensor_split(tokens, streams), torch.tensor_split(mask, streams)))

        def run(group: tuple[Tensor, Tensor]):
            return _losses(model, coders, *group, needed, spliced)
        parts = in_cpu_streams(run, groups)
        for (acts, losses), (_, m) in zip(parts, groups):
            for name, coder in coders.items():
                hp_in, hp_out = _hookpoints(coder)
                x, y = acts[hp_in][m], acts[hp_out][m]
                out = coder(x.to(coder.dtype))
                limit = outlier_norms.get(name, 0.0)
                outliers = x.norm(dim=-1) > limit if limit > 0 else None
                stats[name].update(out.out.float(), y.float(), out.acts, outlier_mask=outliers)
                for key, value in losses[name].items():
                    ce[name][key] = ce[name][key] + value
        kept = int(mask.sum())
        seen += kept
        bar.update(kept)
        if seen >= n_tokens:
            break
    bar.close()
    results = {}
    for name, coder in coders.items():
        c = ce[name]
        clean, spl, zero = c["clean"].mean, c["spliced"].mean, c["zero"].mean
        rec = (ce_loss_recovered(clean, spl, zero) if spliced and abs(zero - clean) > 1e-9
               else math.nan)
        limit = outlier_norms.get(name, 0.0)
        rule = f"token norm > {limit:.4g}" if limit > 0 else "none"
        results[name] = CoderEval(stats[name].compute(), clean, spl, zero, rec, spl - clean,
                                  c["kl"].mean, c["kl_zero"].mean, seen, rule,
                                  stats[name].top_variance_dims(3))
    return results


def write_report(result: CoderEval, folder: str | Path, title: str) -> Path:
    """Write metrics.json and the density histogram PNG next to a coder; return the PNG path."""
    from ..metrics import plot_density_histogram
    from ..utils import atomic_write_json

    folder = Path(folder)
    atomic_write_json(folder / "metrics.json", {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                for k, v in result.scalars().items()})
    return plot_density_histogram(result.recon.density, folder / "density.png", title=title)
