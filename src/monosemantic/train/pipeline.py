"""From text to trained coders: cache the activations a run needs, then train on the cache.

Caching first costs one forward pass (the same one streaming would need), stops the model at the
deepest hookpoint, and buys exact resumption (the batch at step s depends only on the seed and s)
and reuse across runs with the same data.

With an e2e loss (train/e2e.py) there is no cache: every step runs the model on token contexts
of the train split (as many distinct contexts as the budget needs, then epochs over them).

In a torchrun run rank 0 builds the cache while the others wait, then every rank reads its own
rows of each batch (train/distributed.py); the cache folder must be on a filesystem all ranks see.
"""

from __future__ import annotations

from pathlib import Path

from ..coders import SparseCoder
from ..data import CacheRequest, build_cache, load_corpus, special_token_ids
from .distributed import Parallel, shard_batches
from .e2e import LossConfig, SplicedObjective, token_batches
from .loop import CoderSpec, Trainer


def train_on_corpus(lm, corpus: str, specs: list[CoderSpec], out: str | Path, ctx_len: int = 256,
                    forward_batch: int = 8, cache_folder: str | Path | None = None,
                    text_field: str = "text", progress: bool = True,
                    parallel: Parallel | None = None,
                    loss: LossConfig | None = None,
                    forward_dtype: str = "float32") -> dict[str, SparseCoder]:
    """Cache `specs`' hookpoints over the train split of `corpus`, then train every coder
    (on this rank: all coders in data mode, its own in layers mode). With an e2e `loss`, train
    through the model on token contexts instead (`train_spliced`). `forward_dtype` is the
    caching forward's (`harvest_batch`)."""
    parallel = parallel or Parallel.current()
    if loss is not None and loss.needs_model:
        if forward_dtype != "float32":
            raise ValueError(f"forward_dtype={forward_dtype!r} sets the caching forward pass, and "
                             f"the {loss.loss!r} loss caches nothing: drop --forward-dtype")
        return train_spliced(lm, corpus, specs, out, loss, ctx_len, text_field, progress, parallel)
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
                           exclude_ids=tuple(special_token_ids(lm.tokenizer)),
                           forward_dtype=forward_dtype)
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


def train_spliced(lm, corpus: str, specs: list[CoderSpec], out: str | Path, loss: LossConfig,
                  ctx_len: int = 256, text_field: str = "text",
                  progress: bool = True, parallel: Parallel | None = None) -> dict[str, SparseCoder]:
    """Train every coder with an e2e loss (or the local + KL fine-tune route) on token contexts
    of the train split: batch_size tokens per step = batch_size // ctx_len contexts. Under
    torchrun every rank runs the model on its share of each batch's contexts."""
    from ..hooks import hookpoint_widths

    cfg = specs[0].config
    contexts = cfg.batch_size // ctx_len
    if contexts < 1 or cfg.batch_size % ctx_len:
        raise ValueError(f"batch_size={cfg.batch_size}: e2e training steps on whole contexts, so "
                         f"the batch size must be a multiple of ctx_len={ctx_len} "
                         f"(e.g. --batch-size {max(1, contexts) * ctx_len})")
    hookpoints = list(dict.fromkeys(h for s in specs for h in (s.hookpoint, s.out_hookpoint) if h))
    widths = hookpoint_widths(lm.model, hookpoints)
    docs = load_corpus(corpus, "train", text_field=text_field).documents
    steps = cfg.tokens // cfg.batch_size
    objective = SplicedObjective(lm.model, loss, specs, steps, special_token_ids(lm.tokenizer),
                                 contexts=contexts)
    source = {"model": lm.name, "corpus": corpus, "split": "train", "ctx_len": ctx_len}
    parallel = parallel or Parallel.current()
    if contexts < parallel.world:
        raise ValueError(f"{contexts} contexts per batch cannot be split between {parallel.world} "
                         f"ranks; use --batch-size {parallel.world * ctx_len} or more")
    trainer = Trainer(specs, widths, out, source=source, device=next(lm.model.parameters()).device,
                      objective=objective, parallel=parallel)
    batches = token_batches(lm.tokenizer, docs, ctx_len, lm.bos_token_id, contexts,
                            n_contexts=steps * contexts, seed=cfg.seed)
    return trainer.fit(shard_batches(batches, parallel.rank, parallel.world), progress=progress)
