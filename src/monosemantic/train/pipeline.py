"""From text to trained coders: cache the activations a run needs, then train on the cache.

Caching first costs one forward pass (the same one streaming would need), stops the model at the
deepest hookpoint, and buys exact resumption (the batch at step s depends only on the seed and s)
and reuse across runs with the same data.

In a torchrun run rank 0 builds the cache while the others wait, then every rank reads its own
rows of each batch (train/distributed.py); the cache folder must be on a filesystem all ranks see.
"""

from __future__ import annotations

from pathlib import Path

from ..coders import SparseCoder
from ..data import CacheRequest, build_cache, load_corpus, special_token_ids
from .distributed import Parallel
from .loop import CoderSpec, Trainer


def train_on_corpus(lm, corpus: str, specs: list[CoderSpec], out: str | Path, ctx_len: int = 256,
                    forward_batch: int = 8, cache_folder: str | Path | None = None,
                    text_field: str = "text", progress: bool = True,
                    parallel: Parallel | None = None) -> dict[str, SparseCoder]:
    """Cache `specs`' hookpoints over the train split of `corpus`, then train every coder
    (on this rank: all coders in data mode, its own in layers mode)."""
    parallel = parallel or Parallel.current()
    cfg = specs[0].config
    hookpoints = []
    for s in specs:
        for h in (s.hookpoint, s.out_hookpoint):
            if h and h not in hookpoints:
                hookpoints.append(h)
    docs = load_corpus(corpus, "train", text_field=text_field).documents
    request = CacheRequest(model=lm.name, corpus=corpus, split="train", hookpoints=tuple(hookpoints),
                           n_tokens=cfg.tokens, ctx_len=ctx_len, batch_size=forward_batch,
                           contexts_per_shard=8 * forward_batch,
                           exclude_ids=tuple(special_token_ids(lm.tokenizer)))
    cache = parallel.main_first(  # rank 0 builds; the others then open the finished cache
        lambda: build_cache(lm, docs, request, cache_folder, progress=progress and parallel.is_main),
        "build the activation cache", patient=True)
    source = {"model": lm.name, "corpus": corpus, "split": "train", "ctx_len": ctx_len,
              "cache": request.to_json()}
    trainer = Trainer(specs, cache.widths, out, source=source, device=parallel.device,
                      parallel=parallel)
    return trainer.fit(lambda start: cache.batches(cfg.batch_size, seed=cfg.seed, start_step=start,
                                                   hookpoints=hookpoints, rank=parallel.rank,
                                                   world_size=parallel.world), progress=progress)
