"""Corpora -> packed token contexts -> activations (streamed or cached on disk)."""

from .activations import ActivationChunk, ShuffleBuffer, harvest, harvest_batch
from .cache import ActivationCache, CacheRequest, build_cache, list_caches
from .corpora import BUNDLED_CORPORA, Corpus, load_corpus, read_documents
from .tokens import iter_contexts, keep_mask, special_token_ids

__all__ = [
    "ActivationCache", "ActivationChunk", "BUNDLED_CORPORA", "CacheRequest", "Corpus",
    "ShuffleBuffer", "build_cache", "harvest", "harvest_batch", "iter_contexts", "keep_mask",
    "list_caches", "load_corpus", "read_documents", "special_token_ids",
]
