"""Command line: one subcommand per capability, each a thin layer over the library.

Options come from dataclasses (simple_parsing): the docstring under each field is its `--help`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from .evaluate.sweep import SweepGrid
from .toy import ToyConfig
from .train.config import TrainConfig
from .train.distributed import DistConfig, DistributedError
from .train.e2e import LossConfig

import simple_parsing
from simple_parsing import field

log = logging.getLogger("monosemantic")


@dataclass
class ModelCorpusArgs:
    """The model and corpus a command reads (shared by cache and train)."""

    model: str = field(positional=True, metavar="MODEL")
    """Model: a bundled name (smollm2-135m), a local HF folder, a .gguf file or an HF hub id."""
    corpus: str = field(positional=True, metavar="CORPUS")
    """Corpus: wiki-vital, pydoc, a .txt/.md/.jsonl file, a folder of them, or hf:NAME[:SPLIT]."""
    text_field: str = "text"
    """Field holding the text, for .jsonl files and HF datasets."""
    trust_remote_code: bool = False
    """Allow HF hub models that run their own code (off unless you trust the repository)."""


@dataclass
class CacheArgs(ModelCorpusArgs):
    """Run a model over a corpus once and store the activations of one or more hookpoints on disk
    (sharded memory-mapped arrays plus a JSON manifest). A killed run resumes where it stopped."""

    hookpoints: list[str] = field(default_factory=lambda: ["model.layers.15"])
    """Hookpoints: HF module names, shell globs allowed (model.layers.*.mlp); add ':input' to read
    a module's input instead of its output. Widths are read off the model."""
    tokens: int = 100_000
    """Number of (kept) tokens to cache."""
    split: str = "train"
    """Corpus split: train, eval (a deterministic 5 percent of documents) or all."""
    ctx_len: int = 256
    """Context length in tokens; each context starts with BOS."""
    batch_size: int = 8
    """Contexts per forward pass."""
    contexts_per_shard: int = 64
    """Contexts per shard file (a multiple of batch_size); the unit of resumption."""
    dtype: str = "float32"
    """Storage dtype: float32 or float16."""
    forward_dtype: str = "float32"
    """The model's matmuls while caching: float32, or bfloat16 (torch.autocast; norms and the
    residual stream stay fp32, activations are stored fp32). On the bundled model's layer 15:
    2.3x faster on a CPU with AMX, at an error of 0.0015 FVU against fp32 (BENCHMARKS.md); much
    slower on CPUs without bf16 units."""
    keep_special: bool = False
    """Keep BOS/EOS/padding positions (excluded by default: their activations are outliers)."""
    out: str = ""
    """Cache folder; default: <cache>/activations/<model>-<corpus>-<split>-<hash>."""


@dataclass
class InfoArgs:
    """List the bundled models and corpora, what is cached, or the hookpoints of one model."""

    model: str = ""
    """If given, load this model and list its hookpoints with their widths."""


@dataclass
class TrainArgs(ModelCorpusArgs):
    """Train sparse coders on a model's activations: one coder per hookpoint, all from one pass
    over the data (cached on disk first, so a killed run resumes exactly), then evaluate them on
    held-out text and print the metrics table."""

    hookpoints: list[str] = field(default_factory=lambda: ["model.layers.15"])
    """Input hookpoints (HF module names, globs allowed; ':input' reads a module's input).
    Attention: attn.N is block N's concatenated head outputs (the input of its output projection,
    found by module name: model.layers.N.self_attn.o_proj:input on Llama,
    transformer.h.N.attn.c_proj:input on GPT-2), attn.N.out the attention block's output;
    eval then reports each feature's share per head."""
    out_hookpoints: list[str] = field(default_factory=list)
    """For transcoders: the output hookpoint of each input hookpoint, in the same order."""
    out: str = "runs/coder"
    """Output folder: run.json, checkpoint, and one sub-folder per coder (cfg.json + safetensors)."""
    eval_tokens: int = 8192
    """Held-out tokens (eval split) for the metrics table; 0 skips evaluation."""
    ctx_len: int = 256
    """Context length in tokens."""
    forward_batch: int = 8
    """Contexts per forward pass of the model."""
    forward_dtype: str = "float32"
    """The model's matmuls while caching: float32, or bfloat16 (torch.autocast; norms and the
    residual stream stay fp32, activations are stored fp32). On the bundled model's layer 15:
    2.3x faster on a CPU with AMX, at an error of 0.0015 FVU against fp32 (BENCHMARKS.md); much
    slower on CPUs without bf16 units."""
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: LossConfig = field(default_factory=LossConfig)
    """The loss: local reconstruction, e2e (KL through the frozen model), e2e+ds, or local with a
    KL fine-tune at the end (train/e2e.py, Braun et al. 2024). With an e2e loss --batch-size
    counts tokens of whole contexts (a multiple of --ctx-len) and no activation cache is made."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Under torchrun (`torchrun --nproc-per-node N -m monosemantic train ...`): how the ranks split
    the work; see SCALING.md."""
    target_l0: float = 0.0
    """Give a width (--n-features or --expansion) and this instead of --k / --coef / --lr: k = the
    target (top-k family), and the LR (unless --lr is set) and the penalty family's --coef come
    from the fitted rule (--rule), as functions of width, target L0 and the hookpoint's width."""
    rule: str = ""
    """rule.json for --target-l0 (from `monosemantic sweep --fit-rule`); default: the shipped rule,
    fitted on TopK sweeps of SmolLM2-135M at three hookpoints (layers 5 and 15, the layer-15 MLP's
    input), 200k tokens in batches of 1024 (BENCHMARKS.md). It has an LR law only: the penalty
    family needs --coef, or a rule fitted on its sweeps."""


@dataclass
class EvalArgs:
    """Evaluate trained coders on held-out text: FVU, L0, dead/dense features, shrinkage, CE loss
    with the coder spliced in (vs clean and zero-ablation), KL; writes metrics.json and a
    feature-density histogram PNG next to each coder."""

    coders: list[str] = field(positional=True, metavar="CODER", nargs="+")
    """Coder folders (each with cfg.json), or a run folder (all its coders)."""
    model: str = ""
    """Model; default: the one recorded in the run's run.json."""
    corpus: str = ""
    """Corpus; default: the one recorded in the run's run.json."""
    split: str = "eval"
    """Corpus split to evaluate on (eval is disjoint from the training split)."""
    tokens: int = 8192
    """Tokens to evaluate on."""
    ctx_len: int = 256
    """Context length in tokens."""
    forward_batch: int = 8
    """Contexts per forward pass."""
    no_splice: bool = False
    """Skip the spliced CE/KL passes (reconstruction metrics only; faster)."""
    inference: str = "encoder"
    """How feature activations are inferred: encoder (the coder's own), mp (matching pursuit over
    the trained decoder) or gp (gradient pursuit, Blumensath & Davies 2008); pursuit needs an SAE
    and --l0 (coders/pursuit.py)."""
    l0: int = 0
    """Target L0 of pursuit inference (the number of greedy selections)."""


@dataclass
class RefitArgs:
    """Fix shrinkage: refit the active features' magnitudes of a trained coder by least squares
    (encoder and decoder directions frozen; the gains are folded into the encoder), save the
    refitted coder, and compare both on held-out text (bias, FVU, CE, KL)."""

    coder: str = field(positional=True, metavar="CODER")
    """Coder folder (cfg.json + coder.safetensors) inside a run folder."""
    out: str = ""
    """Folder for the refitted coder; default: CODER-refit next to it."""
    tokens: int = 16384
    """Training-split tokens to fit the gains on."""
    eval_tokens: int = 4096
    """Eval-split tokens for the before/after table."""
    model: str = ""
    """Model; default: the one recorded in the run's run.json."""
    corpus: str = ""
    """Corpus; default: the one recorded in the run's run.json."""


@dataclass
class ToyArgs:
    """Toy ground-truth benchmark (Sharkey, Braun & Millidge 2022): train each architecture on
    data with known features in superposition and report how many it recovers (MMCS)."""

    activations: list[str] = field(default_factory=lambda: ["topk", "batchtopk", "jumprelu", "gated", "relu"])
    """Architectures to train."""
    ratios: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """Dictionary sizes as multiples of the number of true features."""
    out: str = "runs/toy"
    """Folder for the trained coders and toy.json."""
    toy: ToyConfig = field(default_factory=ToyConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        tokens=4_000_000, batch_size=256, k=5, lr=3e-3, resample_every=0, dead_tokens=25_000,
        jumprelu_init_threshold=1.0, jumprelu_bandwidth=0.5, lr_warmup=0.01, lr_decay=0.2,
        grad_clip=0.0, input_norm=0.0, calibrate_init=True, recon_loss="mse"))
    """Training options; the toy defaults set k to the toy's mean_active (5), start JumpReLU
    thresholds near the scale of the normalised pre-activations, and resample features dead for
    25k tokens every 400 steps (`TOY_RESAMPLE`: every architecture but TopK, which has AuxK;
    rare features are found by resampling; batch 256 beat 1024 at equal tokens: BENCHMARKS.md).
    They keep the recipe the toy table was measured with (1% warm-up, LR decay over the last
    fifth, no clipping: toy data has no massive activations; inputs at sqrt(D) scale and a
    calibrated encoder for every architecture), not train's newer defaults."""


@dataclass
class SweepArgs(ModelCorpusArgs):
    """Hyperparameter sweep: train a grid of coders (widths x k or coefficient x LR) on each
    hookpoint from one pass over cached activations, evaluate them on held-out text, write
    sweep.json, sweep.md and pareto.png and name the Pareto frontier. With --fit-rule, fit the LR
    and coefficient rule from finished sweeps' sweep.json files instead."""

    model: str = field(positional=True, metavar="MODEL", nargs="?", default="")
    """Model (as for train); not read with --fit-rule."""
    corpus: str = field(positional=True, metavar="CORPUS", nargs="?", default="")
    """Corpus (as for train); not read with --fit-rule."""
    hookpoints: list[str] = field(default_factory=lambda: ["model.layers.15"])
    """Hookpoints (as for train, attn.N allowed); the grid is trained on each."""
    out: str = "runs/sweep"
    """Output folder (coders/ holds the trained coders)."""
    eval_tokens: int = 4096
    """Held-out tokens each coder is evaluated on."""
    splice: bool = False
    """Also measure the CE increase and KL with each coder spliced in (two forward passes of the
    model per coder per batch) and put the frontier on CE increase instead of FVU."""
    ctx_len: int = 256
    """Context length in tokens."""
    forward_batch: int = 8
    """Contexts per forward pass of the model."""
    fit_rule: list[str] = field(default_factory=list)
    """sweep.json files to fit the rule from (LR and coefficient as power laws of width, L0 and
    d_model; evaluate/sweep.py); writes OUT/rule.json and trains nothing (MODEL and CORPUS are
    then not read). --splice fits on CE increase instead of FVU."""
    grid: SweepGrid = field(default_factory=SweepGrid)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(tokens=500_000))
    """Options shared by every coder of the grid (n_features, k, coef and lr come from the grid)."""


def cmd_cache(args: CacheArgs) -> int:
    import time

    from .data import CacheRequest, build_cache, load_corpus, special_token_ids
    from .hooks import resolve_hookpoints
    from .models import load_model

    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    hookpoints = resolve_hookpoints(lm.model, args.hookpoints)
    corpus = load_corpus(args.corpus, args.split, text_field=args.text_field)
    exclude = () if args.keep_special else tuple(special_token_ids(lm.tokenizer))
    request = CacheRequest(model=lm.name, corpus=args.corpus, split=args.split,
                           hookpoints=tuple(hookpoints), n_tokens=args.tokens,
                           ctx_len=args.ctx_len, batch_size=args.batch_size,
                           contexts_per_shard=args.contexts_per_shard, dtype=args.dtype,
                           exclude_ids=exclude, forward_dtype=args.forward_dtype)
    start = time.perf_counter()
    cache = build_cache(lm, corpus.documents, request, args.out or None)
    secs = time.perf_counter() - start
    widths = ", ".join(f"{h} ({w})" for h, w in cache.widths.items())
    print(f"cached {len(cache):,} tokens of {widths} in {secs:.1f} s -> {cache.folder}")
    return 0


def cmd_info(args: InfoArgs) -> int:
    from .data import BUNDLED_CORPORA, list_caches
    from .models import BUNDLED
    from .utils import cache_dir

    if args.model:
        from .hooks import hookpoint_widths, resolve_hookpoints
        from .models import load_model

        lm = load_model(args.model)
        widths = hookpoint_widths(lm.model, resolve_hookpoints(lm.model, "*"), strict=False)
        for name, width in widths.items():
            print(f"{name:60s} {width if width else '(does not run in forward)'}")
        return 0
    root = cache_dir()
    print(f"cache folder: {root}  (set MONOSEMANTIC_CACHE to move it)\n\nbundled models:")
    for name, spec in BUNDLED.items():
        state = "cached" if (root / "models" / name / "model.safetensors").exists() else "not yet fetched"
        print(f"  {name:16s} {spec.description} [{state}]")
    print("\nbundled corpora:")
    for name, desc in BUNDLED_CORPORA.items():
        print(f"  {name:16s} {desc}")
    caches = list_caches()
    print(f"\nactivation caches ({len(caches)}):")
    for c in caches:
        r = c.request
        state = "complete" if c.complete else "partial (resume with the same command)"
        print(f"  {c.folder.name}\n    {r.model} on {r.corpus}/{r.split}: {len(c):,} tokens, "
              f"{', '.join(f'{h} ({w})' for h, w in c.widths.items())}, {r.dtype}, {state}")
    return 0


def _coder_folders(paths: list[str]) -> list[Path]:
    """Coder folders (ours, eai-sparsify's or SAELens'), run folders and folders of hookpoint
    sub-folders; an HF hub repo id (owner/name) that is not a local path is downloaded first."""
    from .coders.interop import download

    folders = []
    for p in map(Path, paths):
        if not p.exists() and p.as_posix().count("/") == 1:
            p = download(p.as_posix())
        if (p / "cfg.json").exists():
            folders.append(p)
        elif (p / "run.json").exists() or any(p.glob("*/cfg.json")):
            folders.extend(sorted(q.parent for q in p.glob("*/cfg.json")))
        else:
            raise ValueError(f"{p} is neither a coder folder (cfg.json) nor a run folder (run.json)")
    if not folders:
        raise ValueError(f"no trained coders found in {', '.join(paths)}")
    return folders


def _evaluate(folders: list[Path], model: str, corpus: str, split: str, tokens: int, ctx_len: int,
              forward_batch: int, splice: bool, lm=None, inference: str = "encoder",
              l0: int = 0) -> None:
    from .coders.interop import adapt_hookpoints, load_any
    from .coders.pursuit import with_inference
    from .evaluate.attention import head_report
    from .data import load_corpus, special_token_ids
    from .evaluate import evaluate_coders, write_report
    from .metrics import format_table
    from .models import load_model
    from .utils import atomic_write_json, read_json

    run = folders[0].parent / "run.json"
    source = read_json(run)["source"] if run.exists() else {}
    model = model or source.get("model", "")
    corpus = corpus or source.get("corpus", "")
    if not model or not corpus:
        raise ValueError("no run.json beside the coders says which model and corpus they belong "
                         "to: pass --model and --corpus")
    lm = lm or load_model(model)
    coders, limits = {}, {}
    for f in folders:
        coders[f.name] = adapt_hookpoints(load_any(f), lm.model)  # any layout; peers' names
        info = f / "training.json"
        if info.exists():
            t = read_json(info)
            limits[f.name] = t["outlier_multiple"] * t["median_norm"]
    docs = load_corpus(corpus, split).documents
    inferred = {n: with_inference(c, inference, l0) for n, c in coders.items()}
    results = evaluate_coders(lm, inferred, docs, tokens, ctx_len, forward_batch,
                              special_token_ids(lm.tokenizer), limits, spliced=splice)
    rows = []
    for f in folders:
        r = results[f.name]
        if inference == "encoder":
            png = write_report(r, f, title=f"{f.name}: feature density ({r.n_tokens} tokens)")
        else:  # the encoder's metrics.json stays; pursuit results go beside it
            png = f / f"metrics-{inference}-l0{l0}.json"
            atomic_write_json(png, {k: (None if isinstance(v, float) and v != v else v)
                                    for k, v in r.scalars().items()})
        m = r.recon
        rows.append({"coder": f.name, "fvu": m.fvu, "fvu w/o outliers": m.fvu_excluding_outliers,
                     "l0": m.l0, "dead %": 100 * m.dead_fraction,
                     "dense %": 100 * m.dense_fraction, "cos": m.cosine,
                     "rel. bias": m.relative_reconstruction_bias, "ce clean": r.ce_clean,
                     "ce spliced": r.ce_spliced, "ce zero": r.ce_zero,
                     "ce recovered": r.ce_loss_recovered, "kl": r.kl, "outliers": m.n_outliers})
        log.info("wrote %s and %s", f / "metrics.json", png)
    print(f"\n{model} on {corpus}/{split}, {results[folders[0].name].n_tokens} tokens:")
    print(format_table(rows))
    print("\nhighest-variance dimensions (share of variance, own FVU):")
    for f in folders:
        dims = ", ".join(f"dim {d.dim}: {100 * d.variance_share:.1f}%, fvu {d.fvu:.3f}"
                         for d in results[f.name].top_dims)
        print(f"  {f.name}: {dims}")
    for f in folders:  # coders on attention: which heads their most frequent features write through
        heads = head_report(coders[f.name], lm.model, results[f.name].recon.density.float())
        if heads is None:
            continue
        atomic_write_json(f / "heads.json", {"site": heads.site.module, "written": heads.written,
                                             "single_head_fraction": heads.single_head_fraction,
                                             "top": heads.top,
                                             "shares": heads.shares.tolist()})
        print(f"\nhead attribution of {f.name} ({heads.written} of {heads.site.module}, "
              f"{heads.site.n_heads} heads): {100 * heads.single_head_fraction:.1f}% of firing "
              "features write > 90% through one head; most frequent features:")
        print(format_table([{"feature": t["feature"], "density": t["density"], "head": t["head"],
                             "share": t["share"]} for t in heads.top]))
    outliers = {f.name: results[f.name].outlier_rule for f in folders}
    print("outlier rule (counted in the 'outliers' column, included in every metric; "
          "fvu_excluding_outliers in metrics.json): "
          + "; ".join(f"{k}: {v}" for k, v in outliers.items()))


def cmd_train(args: TrainArgs) -> int:
    from .hooks import resolve_hookpoints
    from .models import load_model
    from .train import CoderSpec
    from .train.pipeline import train_on_corpus

    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    ins = resolve_hookpoints(lm.model, _attention_names(lm.model, args.hookpoints))
    outs = (resolve_hookpoints(lm.model, _attention_names(lm.model, args.out_hookpoints))
            if args.out_hookpoints else [])
    if args.train.kind != "sae" and len(outs) != len(ins):
        raise ValueError(f"--kind {args.train.kind} needs one --out-hookpoints entry per input "
                         f"hookpoint: got {len(ins)} inputs ({ins}) and {len(outs)} outputs")
    if args.train.kind == "sae" and outs:
        raise ValueError("--out-hookpoints is for transcoders; add --kind transcoder")
    configs = [args.train] * len(ins)
    if args.target_l0 > 0:
        from .evaluate.sweep import apply_rule, load_rule
        from .hooks import hookpoint_widths

        rule, widths = load_rule(args.rule), hookpoint_widths(lm.model, ins)
        configs = []
        for h in ins:
            cfg, chosen = apply_rule(args.train, rule, args.target_l0, widths[h])
            configs.append(cfg)
            log.info("%s: target L0 %g -> %s", h, args.target_l0,
                     ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in chosen.items() if k in ("k", "coef", "lr")))
    specs = [CoderSpec(h.replace(":", "@"), h, configs[i], outs[i] if outs else "")
             for i, h in enumerate(ins)]
    if args.eval_tokens > 0:  # fail before training, not after, when there is no held-out text
        from .data import load_corpus

        try:
            load_corpus(args.corpus, "eval", text_field=args.text_field)
        except ValueError as err:
            raise ValueError(f"{err}: the corpus is too small for a held-out split; add documents "
                             "or pass --eval-tokens 0") from err
    from .train.distributed import init_distributed

    parallel = init_distributed(args.dist)  # one process unless launched by torchrun
    if not parallel.is_main:  # rank 0 logs; the others only warn
        log.setLevel(logging.WARNING)
    try:
        train_on_corpus(lm, args.corpus, specs, args.out, args.ctx_len, args.forward_batch,
                        text_field=args.text_field, parallel=parallel, loss=args.objective,
                        forward_dtype=args.forward_dtype)
    finally:
        if parallel.world > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()
    if not parallel.is_main:  # rank 0 reports and evaluates
        return 0
    print(f"trained {len(specs)} coder(s) -> {args.out}")
    if args.eval_tokens > 0:
        _evaluate([Path(args.out) / s.name for s in specs], lm.name, args.corpus, "eval",
                  args.eval_tokens, args.ctx_len, args.forward_batch, True, lm=lm)
    return 0


def cmd_eval(args: EvalArgs) -> int:
    _evaluate(_coder_folders(args.coders), args.model, args.corpus, args.split, args.tokens,
              args.ctx_len, args.forward_batch, not args.no_splice, inference=args.inference,
              l0=args.l0)
    return 0


def _attention_names(model, patterns: list[str]) -> list[str]:
    """attn.N -> block N's heads hookpoint, attn.N.out -> its attention output (N may be *)."""
    import re

    from .models import attention_site, decoder_layers

    out = []
    for p in patterns:
        m = re.fullmatch(r"attn\.(\d+|\*)(\.out)?", p)
        if not m:
            out.append(p)
            continue
        layers = range(len(decoder_layers(model))) if m[1] == "*" else [int(m[1])]
        sites = [attention_site(model, i) for i in layers]
        out.extend(s.output_hookpoint if m[2] else s.heads_hookpoint for s in sites)
    return out


def cmd_sweep(args: SweepArgs) -> int:
    from .evaluate.sweep import check_rule, fit_rule_files, run_sweep
    from .utils import atomic_write_text, read_json
    from .hooks import resolve_hookpoints
    from .metrics import format_table
    from .models import load_model

    if args.fit_rule:
        loss = "ce_increase" if args.splice else "fvu"
        rule = fit_rule_files(args.fit_rule, loss)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rule.save(out / "rule.json")
        print(f"lr rule: {rule.lr}\ncoef rule: {rule.coef}")
        if rule.lr is not None:  # how close the rule lands to each group's swept best
            rows = [r for p in args.fit_rule for r in read_json(p)["rows"]]
            table = format_table(check_rule(rows, rule, loss))
            atomic_write_text(out / "rule_check.md", table + "\n")
            print(table)
        print(f"-> {out / 'rule.json'}, {out / 'rule_check.md'}")
        return 0
    if not (args.model and args.corpus):
        raise ValueError("sweep needs MODEL and CORPUS (or --fit-rule SWEEP.json ... to fit a rule "
                         "from finished sweeps)")
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    hookpoints = resolve_hookpoints(lm.model, _attention_names(lm.model, args.hookpoints))
    rows = run_sweep(lm, args.corpus, hookpoints, args.train, args.grid, args.out,
                     args.eval_tokens, args.splice, args.ctx_len, args.forward_batch,
                     args.text_field)
    cols = [c for c in ("coder", "l0", "fvu", "ce_increase", "dead_fraction", "frontier")
            if args.splice or c != "ce_increase"]
    print(format_table([{c: r[c] for c in cols} for r in rows], cols))
    print("frontier: " + ", ".join(r["coder"] for r in rows if r["frontier"]))
    print(f"-> {Path(args.out) / 'sweep.json'}, sweep.md, pareto.png")
    return 0


def cmd_refit(args: RefitArgs) -> int:
    from .coders.interop import adapt_hookpoints, load_any
    from .data import load_corpus, special_token_ids
    from .evaluate.shrinkage import collect_activations, refit_magnitudes
    from .models import load_model
    from .utils import atomic_write_json, read_json

    folder = Path(args.coder)
    run = folder.parent / "run.json"
    source = read_json(run)["source"] if run.exists() else {}
    model, corpus = args.model or source.get("model"), args.corpus or source.get("corpus")
    if not model or not corpus:
        raise ValueError(f"no run.json next to {folder}: pass --model and --corpus")
    lm = load_model(model)
    coder = adapt_hookpoints(load_any(folder), lm.model)  # ours, sparsify's or SAELens' layout
    hps = [coder.cfg.hookpoint] + ([coder.cfg.out_hookpoint] if coder.cfg.out_hookpoint else [])
    docs = load_corpus(corpus, "train").documents
    acts = collect_activations(lm, docs, hps, args.tokens, exclude_ids=special_token_ids(lm.tokenizer))
    x, y = acts[hps[0]], acts[hps[-1]]
    if (folder / "training.json").exists():  # fit on the tokens the trainer trained on
        t = read_json(folder / "training.json")
        if t["outlier_multiple"] > 0 and t.get("outliers_dropped", True):  # older runs dropped them
            keep = x.norm(dim=1) <= t["outlier_multiple"] * t["median_norm"]
            x, y = x[keep], y[keep]
    fit = refit_magnitudes(coder, x, y if len(hps) > 1 else None)
    out = Path(args.out) if args.out else folder.parent / f"{folder.name}-refit"
    fit.coder.save(str(out))
    if (folder / "training.json").exists():
        atomic_write_json(out / "training.json", read_json(folder / "training.json"))
    atomic_write_json(out / "refit.json", {"from": str(folder), "tokens": args.tokens,
                                           "gain_mean": float(fit.gains.mean()),
                                           "gain_min": float(fit.gains.min()),
                                           "gain_max": float(fit.gains.max())})
    print(f"refitted gains: mean {float(fit.gains.mean()):.4f}, range "
          f"[{float(fit.gains.min()):.4f}, {float(fit.gains.max()):.4f}] -> {out}")
    if args.eval_tokens > 0:
        _evaluate([folder, out], model, corpus, "eval", args.eval_tokens, 256, 8, True, lm=lm)
    return 0


def cmd_toy(args: ToyArgs) -> int:
    import dataclasses

    from .metrics import format_table
    from .train.toy_run import train_toy
    from .utils import atomic_write_json

    rows = []
    for act in args.activations:
        for ratio in args.ratios:
            cfg = toy_train_config(args.train, act, int(round(ratio * args.toy.n_features)))
            r = train_toy(args.toy, cfg, Path(args.out) / f"{act}-x{ratio:g}", progress=True)
            rows.append({"activation": act, "dict / N": ratio, "mmcs": r.recovery.mmcs,
                         "recovered >0.9": r.recovery.frac_recovered, "dead %": 100 * r.dead_fraction,
                         "fvu": r.fvu, "l0": r.l0})
    atomic_write_json(Path(args.out) / "toy.json", {"toy": dataclasses.asdict(args.toy),
                                                   "train": args.train.to_dict(), "rows": rows})
    print(format_table(rows))
    return 0


TOY_COEF = {"relu": 2.0, "gated": 5.0, "jumprelu": 3.0}
"""Sparsity coefficients for the toy benchmark's penalty architectures when --coef is not given."""

TOY_RESAMPLE = {"relu": 400, "gated": 400, "jumprelu": 400, "batchtopk": 400}
"""Steps between resamplings of dead features in the toy benchmark when --train.resample-every is
not given (0 there). TopK is left to AuxK alone, the trainer's default: with dead meaning 25k
tokens without firing, resampling re-pointed latents that were learning the rarest true features
(firing probability 0.0004); at dict N, 2M tokens, MMCS 0.917 with it and 0.965 without.
BatchTopK, whose threshold is shared by the batch, does better with it: 0.947 against 0.937
(BENCHMARKS.md)."""


def toy_train_config(train: TrainConfig, activation: str, n_features: int) -> TrainConfig:
    """The toy benchmark's config for one architecture: `train` with TOY_COEF and TOY_RESAMPLE
    filling a coefficient or resampling interval left at 0."""
    import dataclasses

    return dataclasses.replace(train, activation=activation, n_features=n_features,
                               coef=train.coef or TOY_COEF.get(activation, 0.0),
                               resample_every=train.resample_every or TOY_RESAMPLE.get(activation, 0))


COMMANDS = {
    "train": (TrainArgs, cmd_train),
    "eval": (EvalArgs, cmd_eval),
    "refit": (RefitArgs, cmd_refit),
    "toy": (ToyArgs, cmd_toy),
    "sweep": (SweepArgs, cmd_sweep),
    "cache": (CacheArgs, cmd_cache),
    "info": (InfoArgs, cmd_info),
}


def build_parser() -> simple_parsing.ArgumentParser:
    dash = simple_parsing.DashVariant.DASH
    parser = simple_parsing.ArgumentParser(
        prog="monosemantic", add_option_string_dash_variants=dash,
        description="Sparse coders, decompiled networks, circuits and deep description.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=simple_parsing.ArgumentParser)
    for name, (cls, _) in COMMANDS.items():
        summary = (cls.__doc__ or "").strip().split("\n")[0]
        p = sub.add_parser(name, help=summary, description=cls.__doc__,
                           add_option_string_dash_variants=dash)
        p.add_arguments(cls, dest="args")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ValueError as err:  # a config's __post_init__ rejected the options
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _, run = COMMANDS[args.command]
    from .utils import keep_freed_memory

    keep_freed_memory()  # no page-fault churn from re-allocating each batch's tensors
    try:
        return run(args.args)
    except (ValueError, FileNotFoundError, FloatingPointError, DistributedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
