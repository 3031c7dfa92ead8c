"""CoderConfig: the shape and kind of one sparse coder (SAE, transcoder or skip transcoder).

A coder maps an input activation x [D_in] to F feature activations and those to an output [D_out]:
an SAE reconstructs x (D_out == D_in), a transcoder predicts a later activation y from x (Dunefsky
et al. 2024, "Transcoders find interpretable LLM feature circuits"), and a skip transcoder adds a
learned linear path x @ W_skip.T (Paulo et al. 2025, "Transcoders beat sparse autoencoders").

The config is frozen. Values that depend on other fields are properties (`d_output`,
`resolved_penalty`), never written back. Which activations exist, which penalties each accepts and
whether it needs `k` are read from the architecture registry, so a new architecture is a new file
plus one import line in `coders/__init__.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

KINDS = ("sae", "transcoder", "skip_transcoder")
PENALTIES = ("auto", "none", "l0", "l1", "lp")


@dataclass(frozen=True)
class CoderConfig:
    d_in: int
    """Input width D_in (callers infer it from the model)."""
    n_features: int
    """Number of features F (the dictionary size)."""
    kind: str = "sae"
    """"sae" reconstructs its input; "transcoder" predicts `out_hookpoint` from `hookpoint`;
    "skip_transcoder" is a transcoder with an extra linear skip path W_skip."""
    d_out: int | None = None
    """Output width D_out; None means d_in. Must equal d_in for kind="sae"."""
    activation: str = "topk"
    """The architecture, a key of the registry: "topk", "batchtopk", "jumprelu", "gated", "relu"."""
    k: int | None = None
    """Active features per token for topk/batchtopk (required there, 1 <= k <= n_features);
    must be None for the other activations, which set their sparsity with a penalty."""
    penalty: str = "auto"
    """Sparsity penalty returned as `sparsity_loss`: "l1" (activations weighted by decoder norms),
    "lp" (the same to the power p), "l0" (jumprelu only, straight-through), "none", or "auto" for the
    architecture's default (topk/batchtopk: none, relu/gated: l1, jumprelu: l0)."""
    p: float = 1.0
    """Exponent of the "lp" penalty, 0 < p <= 1 (the trainer may anneal it per step)."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of JumpReLU's straight-through gradient, in the units of the
    pre-activations the coder is trained on (normalised inputs)."""
    jumprelu_init_threshold: float = 0.001
    """Initial JumpReLU threshold of every feature (> 0)."""
    hookpoint: str = ""
    """The input hookpoint (HF module name); metadata saved in cfg.json."""
    out_hookpoint: str = ""
    """The output hookpoint of a transcoder; metadata saved in cfg.json."""

    def __post_init__(self) -> None:
        from monosemantic.coders.registry import REGISTRY  # lazy: the registry imports the coders

        for name in ("d_in", "n_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is unknown; pick one of {', '.join(KINDS)}")
        if self.d_out is not None and (not isinstance(self.d_out, int) or self.d_out < 1):
            raise ValueError(f"d_out={self.d_out!r} must be a positive integer or None (= d_in)")
        if self.kind == "sae" and self.d_out not in (None, self.d_in):
            raise ValueError(f"d_out={self.d_out} differs from d_in={self.d_in}, but an SAE "
                             "reconstructs its input; use kind='transcoder' or leave d_out=None")
        if self.activation not in REGISTRY:
            raise ValueError(f"activation={self.activation!r} is not registered; pick one of "
                             f"{', '.join(sorted(REGISTRY))}")
        arch = REGISTRY[self.activation]
        if arch.uses_k:
            if self.k is None:
                raise ValueError(f"k is required for activation={self.activation!r}; "
                                 "set k to the number of active features per token")
            if not isinstance(self.k, int) or self.k < 1:
                raise ValueError(f"k={self.k!r} must be a positive integer")
            if self.k > self.n_features:
                raise ValueError(f"k={self.k} is larger than the width n_features="
                                 f"{self.n_features}; pick k <= n_features")
        elif self.k is not None:
            raise ValueError(f"k={self.k} is only used by top-k activations; activation="
                             f"{self.activation!r} sets sparsity with `penalty`, so leave k=None")
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty={self.penalty!r} is unknown; pick one of {', '.join(PENALTIES)}")
        if self.penalty != "auto" and self.penalty not in arch.penalties:
            raise ValueError(f"penalty={self.penalty!r} is not available for activation="
                             f"{self.activation!r}; pick one of {', '.join(arch.penalties)} or 'auto'")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p={self.p} is out of range; the lp penalty needs 0 < p <= 1")
        if not self.jumprelu_bandwidth > 0:
            raise ValueError(f"jumprelu_bandwidth={self.jumprelu_bandwidth} must be > 0")
        if not self.jumprelu_init_threshold > 0:
            raise ValueError(f"jumprelu_init_threshold={self.jumprelu_init_threshold} must be > 0")

    @property
    def d_output(self) -> int:
        """The output width: d_out, or d_in when d_out is None."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def resolved_penalty(self) -> str:
        """`penalty` with "auto" replaced by the architecture's default."""
        from monosemantic.coders.registry import REGISTRY

        return REGISTRY[self.activation].default_penalty if self.penalty == "auto" else self.penalty

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown CoderConfig keys {unknown}; valid keys are {sorted(names)}. "
                             "Remove them (was the file written by a newer version?)")
        return cls(**d)
