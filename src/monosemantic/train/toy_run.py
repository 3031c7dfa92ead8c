"""Train a coder on toy superposition data and score how well it recovers the true features.

The batch at step s is drawn from a generator seeded by (seed, s), so toy runs resume exactly
like runs on cached activations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ..metrics import feature_density
from ..toy import ToyConfig, ToyData, toy_recovery
from ..toy.recovery import ToyRecovery, best_matches
from .config import TrainConfig
from .loop import CoderSpec, Trainer

HOOKPOINT = "toy"


@dataclass
class ToyResult:
    recovery: ToyRecovery
    fvu: float
    l0: float
    dead_fraction: float
    best_cosine: list[float] = dataclasses.field(default_factory=list)
    """Per true feature (commonest first), its best cosine with a learned direction."""
    matched_density: list[float] = dataclasses.field(default_factory=list)
    """Per true feature, the firing density on the eval samples of its best-matching latent."""


def toy_batches(data: ToyData, batch_size: int, seed: int):
    def from_step(start: int) -> Iterator[dict[str, Tensor]]:
        step = start
        while True:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            yield {HOOKPOINT: data.sample(batch_size, gen).x}
            step += 1
    return from_step


def train_toy(toy: ToyConfig, config: TrainConfig, out: str | Path, progress: bool = False,
              eval_tokens: int = 16384) -> ToyResult:
    data = ToyData(toy)
    trainer = Trainer([CoderSpec("coder", HOOKPOINT, config)], {HOOKPOINT: toy.d}, out,
                      source={"toy": dataclasses.asdict(toy)})
    coder = trainer.fit(toy_batches(data, config.batch_size, config.seed), progress=progress)["coder"]
    gen = torch.Generator().manual_seed(10**9 + config.seed)
    x = data.sample(eval_tokens, gen).x
    with torch.no_grad():
        out_ = coder(x)
    density = feature_density(out_.acts)
    fvu = float((x - out_.out).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    rec = toy_recovery(coder.W_dec.detach(), data.features, density)
    best = best_matches(coder.W_dec, data.features)
    return ToyResult(rec, fvu, float((out_.acts > 0).sum(-1).float().mean()),
                     float((density == 0).float().mean()), best.values.tolist(),
                     density[best.indices].tolist())
