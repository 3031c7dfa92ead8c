"""Tokenise documents and pack them into fixed-length contexts that start with BOS.

Packing (as in sparsify and SAELens): documents are tokenised without special tokens, joined with
an EOS separator into one stream, and cut into pieces of `ctx_len - 1` tokens, each prefixed with
BOS. The last partial piece is dropped. Tokenisation runs lazily in chunks of documents, so asking
for a few thousand tokens of a large corpus tokenises only the first documents.

`keep_mask` marks the positions whose activations are used: by default every position whose token
is not a special token (BOS, EOS, padding), since those carry activations far off the distribution
of ordinary tokens (sparsify issue #102; "massive activations").
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

CHUNK_DOCS = 256


def special_token_ids(tokenizer) -> list[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


def iter_contexts(tokenizer, documents: list[str], ctx_len: int, bos_id: int,
                  sep_id: int | None = None) -> Iterator[np.ndarray]:
    """Yield packed contexts (int64 arrays of length `ctx_len`, each starting with `bos_id`)."""
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be at least 2 (BOS plus one token), got {ctx_len}")
    if sep_id is None:
        sep_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos_id
    body = ctx_len - 1
    pending: list[int] = []
    for start in range(0, len(documents), CHUNK_DOCS):
        chunk = documents[start:start + CHUNK_DOCS]
        encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pending.extend(ids)
            pending.append(sep_id)
        n_full = len(pending) // body
        for i in range(n_full):
            piece = pending[i * body:(i + 1) * body]
            yield np.asarray([bos_id, *piece], dtype=np.int64)
        pending = pending[n_full * body:]


def keep_mask(tokens: torch.Tensor, exclude_ids: list[int]) -> torch.Tensor:
    """Boolean mask [B, T]: True where the token is not one of `exclude_ids`."""
    if not exclude_ids:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.as_tensor(exclude_ids, dtype=tokens.dtype))
