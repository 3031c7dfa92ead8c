"""Sparse coders: SAEs, transcoders and skip transcoders, one file per architecture.

    from monosemantic.coders import CoderConfig, build_coder, load_coder
    coder = build_coder(CoderConfig(d_in=512, n_features=4096, activation="topk", k=32))
    coder.save("out/layer3"); coder = load_coder("out/layer3")

A new architecture is a new file with a `@register("name")` SparseCoder subclass plus one import
line below.
"""

from monosemantic.coders.base import EncoderOutput, ForwardOutput, SparseCoder, SparseForwardOutput
from monosemantic.coders.config import CoderConfig
from monosemantic.coders.io import build_coder, load_coder
from monosemantic.coders.registry import REGISTRY, get, register
from monosemantic.coders.sparse import ActiveSet

from monosemantic.coders import topk  # noqa: F401,E402
from monosemantic.coders import batchtopk  # noqa: F401,E402
from monosemantic.coders import jumprelu  # noqa: F401,E402
from monosemantic.coders import gated  # noqa: F401,E402
from monosemantic.coders import relu  # noqa: F401,E402

__all__ = ["ActiveSet", "CoderConfig", "EncoderOutput", "ForwardOutput", "SparseCoder",
           "SparseForwardOutput", "REGISTRY",
           "build_coder", "get", "load_coder", "register"]
