"""Hyperparameter sweeps: a grid of coders from one pass, its Pareto frontier, and a fitted rule.

A sweep trains every combination of widths x (k for the top-k family, or sparsity coefficient for
the penalty family) x learning rates on each hookpoint from ONE pass over cached activations (the
Trainer trains many coders per batch), evaluates them on held-out text, and writes:
  sweep.json   the grid, the options and one row per coder (L0, FVU, dead fraction, CE/KL if
               spliced, whether it is on the frontier);
  sweep.md     the same as a markdown table, frontier rows marked;
  pareto.png   FVU (and CE increase) against L0, frontier joined.
The frontier is the set of coders no other coder of the same hookpoint beats on both L0 and the
loss (FVU, or CE increase when measured).

The rule (`fit_rule`): from the rows of one or more sweep.json files,
  LR:   per group (hookpoint, width, k or coefficient) the best LR, refined by a parabola through
        the best grid point and its neighbours in log LR; then least squares
        log lr = a + b log width + c log L0 + d log d_model;
  coef: penalty-family rows at their group's best LR, log coef = a + b log width + c log L0 +
        d log d_model (so the coefficient for a target L0 can be read off).
A covariate that does not vary in the data (one d_model, say) gets exponent 0 and is listed in
`fixed`: the rule cannot extrapolate along it.

`apply_rule` turns a width and a target L0 into a training config (`monosemantic train
--target-l0`): k = the target for the top-k family, the LR and (penalty family) the coefficient
from the rule; `DEFAULT_RULE` is the shipped rule (TopK sweeps on SmolLM2-135M).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..train import CoderSpec, TrainConfig
from ..train.config import PENALTY_ACTIVATIONS
from ..utils import atomic_write_json, atomic_write_text, read_json


@dataclass(frozen=True)
class SweepGrid:
    """The grid: every combination is one coder per hookpoint."""

    widths: list[int] = field(default_factory=lambda: [4096, 8192])
    """Numbers of features."""
    ks: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Active features per token (top-k family)."""
    coefs: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    """Sparsity coefficients (relu, gated, jumprelu); see `monosemantic train --help` for scales."""
    lrs: list[float] = field(default_factory=lambda: [0.0])
    """Learning rates; 0 = the automatic 2e-4 / sqrt(F / 2^14)."""

    def __post_init__(self):
        for name in ("widths", "ks", "coefs", "lrs"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty: the grid needs at least one value")
        if min(self.widths) < 1 or min(self.ks) < 1 or min(self.coefs) <= 0 or min(self.lrs) < 0:
            raise ValueError("widths and ks must be >= 1, coefs > 0, lrs >= 0 (0 = automatic)")


def grid_specs(hookpoints: list[str], base: TrainConfig, grid: SweepGrid) -> list[CoderSpec]:
    """One CoderSpec per hookpoint and grid point, named <hookpoint>-f<width>-<k|c><value>-lr<lr>."""
    penalty = base.activation in PENALTY_ACTIVATIONS
    sparsity = grid.coefs if penalty else grid.ks
    specs = []
    for h, width, s, lr in itertools.product(hookpoints, grid.widths, sparsity, grid.lrs):
        change = {"n_features": width, "lr": lr, **({"coef": s} if penalty else {"k": int(s)})}
        name = f"{h.replace(':', '@')}-f{width}-{'c' if penalty else 'k'}{s:g}-lr{lr:g}"
        specs.append(CoderSpec(name, h, dataclasses.replace(base, **change)))
    return specs


def pareto_frontier(points: list[tuple[float, float]], x_tol: float = 0.0) -> list[int]:
    """Indexes of the points no other point beats on both coordinates (both minimised). x values
    within a relative x_tol count as equal (a top-k coder's L0 of 63.99 is not sparser than 64)."""
    out = []
    for i, (x, y) in enumerate(points):
        if any(not (math.isnan(x) or math.isnan(y))
               and (u <= x * (1 + x_tol) and v <= y and (u < x * (1 - x_tol) or v < y))
               for j, (u, v) in enumerate(points) if j != i):
            continue
        if not (math.isnan(x) or math.isnan(y)):
            out.append(i)
    return out


L0_TOLERANCE = 0.01
"""L0s within 1% of each other count as equal on the frontier (BatchTopK and top-k coders miss k
by a few hundredths on some tokens)."""


def mark_frontier(rows: list[dict], loss: str) -> None:
    """Set rows' 'frontier' (per hookpoint, on (l0, loss))."""
    for h in dict.fromkeys(r["hookpoint"] for r in rows):
        mine = [r for r in rows if r["hookpoint"] == h]
        front = set(pareto_frontier([(r["l0"], r.get(loss, math.nan)) for r in mine], L0_TOLERANCE))
        for i, r in enumerate(mine):
            r["frontier"] = i in front


def write_sweep(rows: list[dict], out: str | Path, meta: dict) -> dict[str, Path]:
    """sweep.json, sweep.md and pareto.png under `out`; returns their paths."""
    from ..metrics import format_table

    out = Path(out)
    loss = "ce_increase" if any(not math.isnan(r.get("ce_increase", math.nan)) for r in rows) else "fvu"
    mark_frontier(rows, loss)
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
             for r in rows]
    atomic_write_json(out / "sweep.json", {**meta, "frontier_on": ["l0", loss], "rows": clean})
    cols = [c for c in ("coder", "n_features", "k", "coef", "lr", "l0", "fvu", "ce_increase", "kl",
                        "dead_fraction", "frontier") if any(c in r for r in rows)]
    lines = [f"# Sweep: {meta.get('model', '')} on {meta.get('corpus', '')}", "",
             f"Frontier on (L0, {loss}) per hookpoint: "
             + ", ".join(r["coder"] for r in rows if r["frontier"]), "", "```",
             format_table([{c: r.get(c, "") for c in cols} for r in rows], cols), "```", ""]
    atomic_write_text(out / "sweep.md", "\n".join(lines))
    return {"json": out / "sweep.json", "md": out / "sweep.md",
            "png": plot_pareto(rows, out / "pareto.png", loss)}


def plot_pareto(rows: list[dict], path: Path, loss: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for h in dict.fromkeys(r["hookpoint"] for r in rows):
        mine = [r for r in rows if r["hookpoint"] == h]
        pts = ax.scatter([r["l0"] for r in mine], [r[loss] for r in mine], s=14, alpha=0.6, label=h)
        front = sorted((r["l0"], r[loss]) for r in mine if r["frontier"])
        if front:
            ax.plot(*zip(*front), color=pts.get_facecolor()[0], lw=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("L0")
    ax.set_ylabel(loss)
    ax.set_title("sweep: frontier joined")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- the fitted rule ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PowerLaw:
    """y = exp(a) * width^b * l0^c * d_model^d."""

    a: float
    b: float
    c: float
    d: float
    fixed: tuple[str, ...] = ()
    """Covariates that did not vary in the data (their exponent is 0; no extrapolation along them)."""
    n: int = 0

    def __call__(self, width: float, l0: float, d_model: float) -> float:
        return math.exp(self.a + self.b * math.log(width) + self.c * math.log(l0)
                        + self.d * math.log(d_model))


@dataclass(frozen=True)
class HyperRule:
    """LR and sparsity coefficient as functions of width, target L0 and d_model."""

    lr: PowerLaw | None
    coef: PowerLaw | None
    fitted_on: tuple[dict, ...] = ()
    """What each sweep the rule was fitted on trained: model, corpus, hookpoints, tokens, batch
    size (a rule fitted at one budget is not a rule for another: the best LR falls as runs get
    longer)."""

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "HyperRule":
        d = read_json(path)
        law = lambda v: None if v is None else PowerLaw(**{**v, "fixed": tuple(v["fixed"])})  # noqa: E731
        return cls(law(d["lr"]), law(d["coef"]), tuple(d.get("fitted_on", ())))


def _fit_power_law(samples: list[tuple[float, float, float, float]]) -> PowerLaw | None:
    """Least squares of log y on log width, log l0, log d_model; samples (width, l0, d, y)."""
    samples = [s for s in samples if all(v > 0 and math.isfinite(v) for v in s)]
    if len(samples) < 2:
        return None
    X = torch.tensor([[math.log(w), math.log(l), math.log(d)] for w, l, d, _ in samples], dtype=torch.float64)
    y = torch.tensor([math.log(s[3]) for s in samples], dtype=torch.float64)
    names = ("width", "l0", "d_model")
    varies = [bool(X[:, j].max() - X[:, j].min() > 1e-9) for j in range(3)]
    cols = [j for j in range(3) if varies[j]]
    A = torch.cat([torch.ones(len(samples), 1, dtype=torch.float64), X[:, cols]], 1)
    sol = torch.linalg.lstsq(A, y[:, None], driver="gelsd").solution[:, 0].tolist()
    coef = [0.0, 0.0, 0.0]
    for j, v in zip(cols, sol[1:]):
        coef[j] = v
    return PowerLaw(sol[0], *coef, fixed=tuple(n for n, v in zip(names, varies) if not v),
                    n=len(samples))


def _best_lr(group: list[dict], loss: str) -> tuple[float, dict]:
    """The group's best LR: the vertex of a parabola in log LR through the best grid point and
    its neighbours (clipped to them), else the best grid point; and that best row."""
    group = sorted(group, key=lambda r: r["lr"])
    i = min(range(len(group)), key=lambda j: group[j][loss])
    if 0 < i < len(group) - 1:
        (x0, y0), (x1, y1), (x2, y2) = ((math.log(group[j]["lr"]), group[j][loss]) for j in (i - 1, i, i + 1))
        den = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
        b = (x2 ** 2 * (y0 - y1) + x1 ** 2 * (y2 - y0) + x0 ** 2 * (y1 - y2)) / den
        if a > 0:
            return math.exp(min(max(-b / (2 * a), x0), x2)), group[i]
    return group[i]["lr"], group[i]


def _groups(rows: list[dict], loss: str) -> dict[tuple, list[dict]]:
    """Rows with an LR and a loss, by (hookpoint, width, k, coef): the LR varies within a group."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("lr", 0) > 0 and r.get(loss) is not None:
            groups.setdefault((r["hookpoint"], r["n_features"], r.get("k"), r.get("coef")), []).append(r)
    return groups


def fit_rule(rows: list[dict], loss: str = "fvu") -> HyperRule:
    """Fit the LR and coefficient rules from sweep rows (each with hookpoint, n_features, d_model,
    lr > 0, l0, `loss`, and k or coef)."""
    lr_samples, coef_samples = [], []
    for group in _groups(rows, loss).values():
        lr, best = _best_lr(group, loss)
        lr_samples.append((best["n_features"], best["l0"], best["d_model"], lr))
        if best.get("coef"):
            coef_samples.append((best["n_features"], best["l0"], best["d_model"], best["coef"]))
    return HyperRule(_fit_power_law(lr_samples), _fit_power_law(coef_samples))


def check_rule(rows: list[dict], rule: HyperRule, loss: str = "fvu") -> list[dict]:
    """How close the rule's LR lands to each group's swept best: per (hookpoint, width, k or coef)
    the best LR (as `fit_rule` finds it), the rule's LR for the group's width, L0 and d_model,
    their ratio, the best loss on the grid and the loss at the rule's LR (interpolated linearly in
    log LR between grid points; NaN outside the grid)."""
    if rule.lr is None:
        raise ValueError("the rule has no LR law to check")
    out = []
    for (hookpoint, width, k, coef), group in _groups(rows, loss).items():
        group = sorted(group, key=lambda r: r["lr"])
        best_lr, best = _best_lr(group, loss)
        want = rule.lr(width, best["l0"], best["d_model"])
        at_rule = math.nan
        for lo, hi in zip(group, group[1:]):
            if lo["lr"] <= want <= hi["lr"]:
                t = (math.log(want) - math.log(lo["lr"])) / (math.log(hi["lr"]) - math.log(lo["lr"]))
                at_rule = lo[loss] + t * (hi[loss] - lo[loss])
        out.append({"hookpoint": hookpoint, "n_features": width, **({"coef": coef} if coef else {"k": k}),
                    "best_lr": best_lr, "rule_lr": want, "rule / best": want / best_lr,
                    f"best {loss}": min(r[loss] for r in group), f"{loss} at rule lr": at_rule})
    return out


def fit_rule_files(paths: list[str | Path], loss: str = "fvu") -> HyperRule:
    """`fit_rule` over the rows of several sweep.json files (for example one per hookpoint)."""
    sweeps = [read_json(p) for p in paths]
    rows = [r for sw in sweeps for r in sw["rows"]]
    if not rows:
        raise ValueError(f"no sweep rows in {', '.join(map(str, paths))}")
    fitted_on = tuple({"model": sw.get("model"), "corpus": sw.get("corpus"),
                       "hookpoints": sw.get("hookpoints"), "activation": sw.get("train", {}).get("activation"),
                       "tokens": sw.get("train", {}).get("tokens"),
                       "batch_size": sw.get("train", {}).get("batch_size")} for sw in sweeps)
    return dataclasses.replace(fit_rule(rows, loss), fitted_on=fitted_on)


DEFAULT_RULE = Path(__file__).resolve().parent.parent / "rules" / "default.json"
"""The rule `train --target-l0` uses unless given another (package data): fitted on TopK sweeps of
SmolLM2-135M at model.layers.5, model.layers.15 and model.layers.15.mlp.down_proj:input, 200k
tokens in batches of 1024 (`fitted_on` in the file; the sweep and the rule's distance to each
swept best are in BENCHMARKS.md). LR law only."""


def load_rule(path: str | Path = "") -> HyperRule:
    """A rule.json (`monosemantic sweep --fit-rule`), or the shipped default."""
    path = Path(path) if path else DEFAULT_RULE
    if not path.exists():
        raise FileNotFoundError(f"no hyperparameter rule at {path}: fit one with `monosemantic sweep "
                                "--fit-rule SWEEP.json ... --out DIR` and pass --rule DIR/rule.json")
    return HyperRule.load(path)


def apply_rule(cfg: TrainConfig, rule: HyperRule, target_l0: float, d_model: int) -> tuple[TrainConfig, dict]:
    """The training config for a target L0 at cfg's width: k = target L0 (top-k family), the LR
    from the rule unless cfg sets one, and the coefficient from the rule (penalty family).
    Returns the config and what was chosen (for the log and run.json)."""
    if target_l0 <= 0:
        raise ValueError(f"target L0 {target_l0} must be > 0")
    width = cfg.resolve(d_model).n_features
    chosen: dict = {"target_l0": target_l0, "width": width, "d_model": d_model}
    changes: dict = {}
    if cfg.activation in PENALTY_ACTIVATIONS:
        if rule.coef is None:
            raise ValueError("the rule has no coefficient law (its sweeps trained the top-k family "
                             f"only), so it cannot choose --coef for {cfg.activation}; pass --coef "
                             "or a rule fitted on penalty-family sweeps")
        changes["coef"] = chosen["coef"] = rule.coef(width, target_l0, d_model)
    else:
        changes["k"] = chosen["k"] = max(1, round(target_l0))
    if cfg.lr == 0:
        if rule.lr is None:
            raise ValueError("the rule has no LR law; pass --lr")
        changes["lr"] = chosen["lr"] = rule.lr(width, target_l0, d_model)
    return dataclasses.replace(cfg, **changes), chosen


# ---- running a sweep ------------------------------------------------------------------------------

def run_sweep(lm, corpus: str, hookpoints: list[str], base: TrainConfig, grid: SweepGrid,
              out: str | Path, eval_tokens: int = 4096, splice: bool = False, ctx_len: int = 256,
              forward_batch: int = 8, text_field: str = "text", progress: bool = True) -> list[dict]:
    """Train the grid on every hookpoint from one pass over cached activations, evaluate each
    coder on the eval split, write sweep.json / sweep.md / pareto.png; return the rows."""
    from ..data import load_corpus, special_token_ids
    from ..train.pipeline import train_on_corpus
    from .spliced import evaluate_coders

    specs = grid_specs(hookpoints, base, grid)
    docs = load_corpus(corpus, "eval", text_field=text_field).documents  # fail before training
    coders = train_on_corpus(lm, corpus, specs, Path(out) / "coders", ctx_len, forward_batch,
                             text_field=text_field, progress=progress)
    limits = {}
    for s in specs:
        t = read_json(Path(out) / "coders" / s.name / "training.json")
        limits[s.name] = t["outlier_multiple"] * t["median_norm"]
    results = evaluate_coders(lm, coders, docs, eval_tokens, ctx_len, forward_batch,
                              special_token_ids(lm.tokenizer), limits, spliced=splice,
                              progress=progress)
    rows = []
    for s in specs:
        r, c = results[s.name], coders[s.name]
        rows.append({"coder": s.name, "hookpoint": s.hookpoint, "activation": s.config.activation,
                     "n_features": c.cfg.n_features, "d_model": c.cfg.d_in,
                     **({"coef": s.config.coef} if s.config.activation in PENALTY_ACTIVATIONS
                        else {"k": s.config.k}),
                     "lr": s.config.resolve(c.cfg.d_in).lr, "l0": r.recon.l0, "fvu": r.recon.fvu,
                     "dead_fraction": r.recon.dead_fraction,
                     "ce_increase": r.ce_increase if splice else math.nan,
                     "kl": r.kl if splice else math.nan})
    meta = {"model": lm.name, "corpus": corpus, "hookpoints": hookpoints,
            "grid": dataclasses.asdict(grid), "train": base.to_dict(), "eval_tokens": eval_tokens}
    write_sweep(rows, out, meta)
    return rows
