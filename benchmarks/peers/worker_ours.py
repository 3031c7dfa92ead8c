"""monosemantic: `Trainer.fit` on the shared batches, with its default path and defaults.

The Trainer reads its batches from the iterator it is given in a background thread while it steps
(train/loop.py's prefetch), so a step's time is taken around the Trainer's per-coder step method
(`Trainer._step`, wrapped here): from the start of one step to the start of the next, so the
loop's own per-step work (logging, waiting for a batch if the reader falls behind) counts, and the
end of the last. Everything else (LR 2e-4 / sqrt(F / 2^14) unless given, 5% warm-up, no decay,
TopK's training scale, initialisation and gradient clip (TrainConfig.resolve), AuxK, outlier tokens
counted and trained on, normalisation folded at the end) is the Trainer's default; --ours-train
overrides any of it. The timed runs (a few steps) take the dead-feature threshold that the epoch's
run resolves (a tenth of its tokens), as the steps they stand for would: by default a feature
would be dead after a tenth of the timed run, under two batches, and AuxK would run every step.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from common import Batches, args, emit, mark_baseline

from monosemantic.train import CoderSpec, TrainConfig, Trainer


def main() -> None:
    a = args()
    data = Batches(a["cache"], a["hookpoint"], a["batch_size"], a["seed"])
    mark_baseline()
    train = a.get("out") is not None
    steps = a["warmup"] + a["steps"]
    kw = dict(activation="topk", n_features=a["n_features"], k=a["k"], tokens=steps * a["batch_size"],
              batch_size=a["batch_size"], lr=a["lr"] or 0.0, seed=a["seed"])
    if a.get("epoch_tokens"):  # timed steps: dead after the epoch's threshold, not these steps'
        epoch = TrainConfig(**{**kw, **a.get("train", {}), "tokens": a["epoch_tokens"]})
        kw["dead_tokens"] = epoch.resolve(data.width).dead_tokens
    cfg = TrainConfig(**{**kw, **a.get("train", {})})  # --ours-train overrides win
    out = Path(a["out"]) if train else Path(tempfile.mkdtemp(prefix="ours-"))
    trainer = Trainer([CoderSpec("coder", a["hookpoint"], cfg)], {a["hookpoint"]: data.width}, out)
    starts, ends = [], []
    step = trainer._step  # (state, batch, step): one coder's training step

    def timed_step(*args, **kw):
        starts.append(time.perf_counter())
        step(*args, **kw)
        ends.append(time.perf_counter())

    trainer._step = timed_step

    def batches(start: int):
        for x in data:
            yield {a["hookpoint"]: x}

    t0 = time.perf_counter()
    trainer.fit(batches, progress=False)
    wall = time.perf_counter() - t0
    times = [b - s for s, b in zip(starts, starts[1:] + ends[-1:])][a["warmup"]:]
    result = {"step_s": times, "wall_s": wall, "lr": trainer.states[0].res.lr}
    if train:
        result.update(folder=str(out / "coder"), layout="monosemantic")
    emit(result)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
