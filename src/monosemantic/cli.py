"""Command line: one subcommand per capability, each a thin layer over the library.

Options come from dataclasses (simple_parsing): the docstring under each field is its `--help`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import simple_parsing
from simple_parsing import field

log = logging.getLogger("monosemantic")


@dataclass
class CacheArgs:
    """Run a model over a corpus once and store the activations of one or more hookpoints on disk
    (sharded memory-mapped arrays plus a JSON manifest). A killed run resumes where it stopped."""

    model: str = field(positional=True, metavar="MODEL")
    """Model: a bundled name (smollm2-135m), a local HF folder, a .gguf file or an HF hub id."""
    corpus: str = field(positional=True, metavar="CORPUS")
    """Corpus: wiki-vital, pydoc, a .txt/.md/.jsonl file, a folder of them, or hf:NAME[:SPLIT]."""
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
    keep_special: bool = False
    """Keep BOS/EOS/padding positions (excluded by default: their activations are outliers)."""
    text_field: str = "text"
    """Field holding the text, for .jsonl files and HF datasets."""
    out: str = ""
    """Cache folder; default: <cache>/activations/<model>-<corpus>-<split>-<hash>."""
    trust_remote_code: bool = False
    """Allow HF hub models that run their own code (off unless you trust the repository)."""


@dataclass
class InfoArgs:
    """List the bundled models and corpora, what is cached, or the hookpoints of one model."""

    model: str = ""
    """If given, load this model and list its hookpoints with their widths."""


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
                           exclude_ids=exclude)
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
        from .hooks import hookpoint_widths
        from .models import load_model

        lm = load_model(args.model)
        names = [n for n, _ in lm.model.named_modules() if n]
        widths = hookpoint_widths(lm.model, names)  # one forward pass for all of them
        for n in names:
            print(f"{n:60s} {widths[n]}")
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


COMMANDS = {
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _, run = COMMANDS[args.command]
    try:
        return run(args.args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
