"""Shared fixtures: tiny random Llama- and GPT-2-shaped models with a character-level tokenizer.

Everything is built in-process from a seed; nothing touches the network. The tokenizer maps each
printable ASCII character to one id (95 of them) after four special tokens, so the vocabulary
is exactly the models' 99 ids. `tiny_model_folder` saves the Llama with its tokenizer so that
`load_model(folder)` and the CLI can load it by path.

Shapes: D = 32 model width, L = 3 layers, V = 99 vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

from monosemantic.models import LoadedModel

SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " "
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
assert len(VOCAB) == 99

# Matmuls of width 32 gain nothing from threads, and on a shared machine OpenMP's spin-waiting
# makes a 2-thread forward pass of the tiny model ~80x slower than a 1-thread one.
torch.set_num_threads(1)
FAMILIES = ("llama", "gpt2")
# the module path of decoder layer i, per family
LAYER = {"llama": "model.layers.{}", "gpt2": "transformer.h.{}"}
DOWN_PROJ = {"llama": "model.layers.{}.mlp.down_proj", "gpt2": "transformer.h.{}.mlp.c_proj"}


def make_tokenizer():
    """A character-level fast tokenizer over printable ASCII with bos/eos/pad/unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                          bos_token_id=0, eos_token_id=1, pad_token_id=2)
        model = LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=99, bos_token_id=0,
                         eos_token_id=1)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    return model.eval().requires_grad_(False)


def make_lm(family: str, seed: int = 0) -> LoadedModel:
    return LoadedModel(model=make_model(family, seed), tokenizer=make_tokenizer(),
                       name=f"tiny-{family}-{seed}")


def sample_documents(n: int = 40, seed: int = 0) -> list[str]:
    """`n` short pseudo-random documents of printable text, of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "sparse", "coder", "feature", "token", "layer",
             "model", "the", "of", "and", "a", "42", "x=1;", "(see", "below)", "Zeta!", "?"]
    docs = []
    for _ in range(n):
        length = int(torch.randint(5, 60, (1,), generator=g))
        idx = torch.randint(len(words), (length,), generator=g).tolist()
        docs.append(" ".join(words[i] for i in idx) + ".")
    return docs


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def lm(family: str) -> LoadedModel:
    """A fresh tiny model of each family (function scope: a test may hook or patch it freely)."""
    return make_lm(family)


@pytest.fixture
def llama() -> LoadedModel:
    return make_lm("llama")


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return sample_documents()


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    """The tiny Llama and its tokenizer saved with `save_pretrained`, loadable by path."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = make_lm("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A plain-text corpus file (one document) of about 12k characters."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(sample_documents(120, seed=1)))
    return path
