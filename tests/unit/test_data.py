"""Corpora, packed contexts and activation harvest on the tiny models.

Shapes: B contexts, T = 16 context length, D = 32 model width, N kept tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import LAYER
from monosemantic.data import (ShuffleBuffer, harvest, iter_contexts, keep_mask, load_corpus,
                               read_documents, special_token_ids)
from monosemantic.data.corpora import in_eval_split
from monosemantic.hooks import capture


def test_pydoc_loads():
    docs = read_documents("pydoc")
    assert len(docs) > 50 and all(d and d == d.strip() for d in docs)
    assert any("for_stmt" in d or "The \"for\" statement" in d for d in docs)


def test_local_files_folders_and_jsonl(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.md").write_text("first file")
    records = [{"text": "doc one", "id": 1}, {"text": "doc two", "id": 2}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "ignored.csv").write_text("x,y")
    assert read_documents(str(tmp_path / "b.txt")) == ["second file"]
    assert read_documents(str(tmp_path / "c.jsonl")) == ["doc one", "doc two"]
    assert read_documents(str(tmp_path)) == ["first file", "second file", "doc one", "doc two"]
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1 has no field 'text'.*body.*--text-field"):
        read_documents(str(tmp_path / "d.jsonl"))
    assert read_documents(str(tmp_path / "d.jsonl"), text_field="body") == ["x"]


def test_unknown_corpus_and_empty_folder_are_explained(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus.*wiki-vital"):
        read_documents(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="holds no .txt"):
        read_documents(str(tmp_path))


def test_split_is_deterministic_disjoint_and_complete():
    everything = load_corpus("pydoc", "all").documents
    train = load_corpus("pydoc", "train", eval_fraction=0.2).documents
    evals = load_corpus("pydoc", "eval", eval_fraction=0.2).documents
    assert load_corpus("pydoc", "eval", eval_fraction=0.2).documents == evals
    assert not set(train) & set(evals)
    assert sorted(train + evals) == sorted(everything)
    assert 0.1 < len(evals) / len(everything) < 0.3
    assert all(in_eval_split(d, 0.2) for d in evals)
    with pytest.raises(ValueError, match="split must be one of"):
        load_corpus("pydoc", "test")


def test_packed_contexts(tokenizer, documents):
    ctxs = list(iter_contexts(tokenizer, documents, ctx_len=16, bos_id=0))
    stream = []
    for d in documents:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ctxs) == len(stream) // 15
    assert all(c.shape == (16,) and c.dtype == np.int64 and c[0] == 0 for c in ctxs)
    assert np.concatenate([c[1:] for c in ctxs]).tolist() == stream[:15 * len(ctxs)]
    with pytest.raises(ValueError, match="ctx_len must be at least 2"):
        next(iter_contexts(tokenizer, documents, ctx_len=1, bos_id=0))


def test_keep_mask_excludes_special_tokens(tokenizer):
    special = special_token_ids(tokenizer)
    assert special == [0, 1, 2, 3]
    tokens = torch.tensor([[0, 5, 1, 9], [2, 3, 40, 0]])
    assert keep_mask(tokens, special).tolist() == [[False, True, False, True],
                                                   [False, False, True, False]]
    assert keep_mask(tokens, []).all()


@torch.no_grad()
def test_harvest_keeps_ordinary_tokens_with_their_coordinates(lm, family, documents):
    h = LAYER[family].format(1)
    special = special_token_ids(lm.tokenizer)
    chunks = list(harvest(lm.model, lm.tokenizer, documents, [h], ctx_len=16, bos_id=0,
                          batch_size=4, exclude_ids=special))
    ctxs = torch.from_numpy(np.stack(list(iter_contexts(lm.tokenizer, documents, 16, 0))))
    with capture(lm.model, [h]) as full:
        lm.model(input_ids=ctxs)
    mask = keep_mask(ctxs, special)
    acts = torch.cat([c.acts[h] for c in chunks])
    coords = torch.cat([c.coords for c in chunks])
    assert torch.equal(torch.cat([c.tokens for c in chunks]), ctxs[mask])
    assert torch.equal(coords, torch.stack(mask.nonzero(as_tuple=True), dim=1))
    torch.testing.assert_close(acts, full[h][mask], rtol=1e-5, atol=1e-5)  # batch 4 vs all


def test_harvest_skip_contexts_resumes_the_stream(llama, documents):
    h = "model.layers.0"
    whole = list(harvest(llama.model, llama.tokenizer, documents, [h], 16, 0, 2, [0, 1]))
    tail = list(harvest(llama.model, llama.tokenizer, documents, [h], 16, 0, 2, [0, 1],
                        skip_contexts=4))
    assert len(tail) == len(whole) - 2
    for a, b in zip(whole[2:], tail):
        assert torch.equal(a.acts[h], b.acts[h]) and torch.equal(a.coords, b.coords)


def test_shuffle_buffer_serves_every_row_once_deterministically(llama, documents):
    chunks = list(harvest(llama.model, llama.tokenizer, documents, ["model.layers.0"], 16, 0, 2, []))
    rows = torch.cat([c.acts["model.layers.0"] for c in chunks])

    def served(seed):
        return torch.cat([b["model.layers.0"] for b in ShuffleBuffer(iter(chunks), 8, 64, seed)])

    a = served(0)
    assert torch.equal(a, served(0)) and not torch.equal(a, served(1))
    assert a.shape == rows.shape and not torch.equal(a, rows)
    assert torch.equal(a[a[:, 0].argsort()], rows[rows[:, 0].argsort()])


def test_cpu_harvest_splits_a_batch_into_passes_of_at_most_cpu_forward_tokens(lm, family, documents,
                                                                               monkeypatch):
    from monosemantic.data import activations

    h = LAYER[family].format(1)
    whole = list(harvest(lm.model, lm.tokenizer, documents, [h], 16, 0, 5, [0]))
    calls = []
    real = activations.run_to_hookpoints
    monkeypatch.setattr(activations, "run_to_hookpoints",
                        lambda model, ids, hps: calls.append(len(ids)) or real(model, ids, hps))
    monkeypatch.setattr(activations, "CPU_FORWARD_TOKENS", 32)  # 2 contexts of 16 per pass
    split = list(harvest(lm.model, lm.tokenizer, documents, [h], 16, 0, 5, [0]))
    assert calls[:3] == [2, 2, 1]  # each batch of 5 contexts as passes of 2, 2 and 1
    assert len(split) == len(whole)
    for a, b in zip(whole, split):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.coords, b.coords)
        torch.testing.assert_close(a.acts[h], b.acts[h], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_harvest_streams_give_the_single_streams_chunks(lm, family, documents, monkeypatch, dtype):
    """With 2 threads a CPU batch runs as 2 side-by-side single-thread streams (cpu_streams): the
    same tokens and coordinates, the same activations (autocast and no-grad reach the stream
    threads), and torch's thread count restored afterwards."""
    from monosemantic.data import activations

    h = LAYER[family].format(1)
    monkeypatch.setattr(activations, "CPU_FORWARD_TOKENS", 32)  # passes of 2 contexts of 16
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert activations.cpu_streams(5) == 2 and activations.cpu_streams(1) == 1
        streamed = list(harvest(lm.model, lm.tokenizer, documents, [h], 16, 0, 5, [0], forward_dtype=dtype))
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("MONOSEMANTIC_FORWARD_STREAMS", "0")
        assert activations.cpu_streams(5) == 1
        single = list(harvest(lm.model, lm.tokenizer, documents, [h], 16, 0, 5, [0], forward_dtype=dtype))
    finally:
        torch.set_num_threads(threads)
    assert len(streamed) == len(single) > 1
    for a, b in zip(streamed, single):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.coords, b.coords)
        torch.testing.assert_close(a.acts[h], b.acts[h], rtol=1e-5, atol=1e-6)
        assert not a.acts[h].requires_grad
