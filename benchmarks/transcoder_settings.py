"""Do TopK's training defaults suit transcoders too: a TopK transcoder of SmolLM2 layer 15's MLP
(post_attention_layernorm -> mlp), 200k cached wiki-vital tokens, batch 1,024, k 32, 4,608
features, trained with TopK's settings of 6e22183 (squared error, unit encoder rows) and of
c8d1055 (per-batch FVU loss, rows of norm 1/sqrt(3)) at two LRs, seed 0, all from one pass; FVU
of the MLP output on 16,384 eval-split tokens.

    python benchmarks/transcoder_settings.py

3 minutes on 2 cores with the caches built (the first run builds them: 216k tokens of forward).
"""

import json
from pathlib import Path

import torch

from monosemantic.data import CacheRequest, build_cache, load_corpus
from monosemantic.metrics import fvu
from monosemantic.models import load_model
from monosemantic.train import CoderSpec, TrainConfig, Trainer

HP, OUT = "model.layers.15.post_attention_layernorm", "model.layers.15.mlp"
SETTINGS = {"old": dict(recon_loss="mse", init_encoder_norm=1.0),  # TopK's settings of 6e22183
            "new": {}}  # the defaults
LRS = (2.5e-4, 2e-3)


def main() -> None:
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m")

    def cache(split: str, n: int):
        req = CacheRequest(model="smollm2-135m", corpus="wiki-vital", split=split, hookpoints=(HP, OUT),
                           n_tokens=n)
        return build_cache(lm, load_corpus("wiki-vital", split).documents, req, req.default_folder())

    train, ev = cache("train", 200_000), cache("eval", 16_384)
    x, y = ev.read(HP, 0, len(ev)), ev.read(OUT, 0, len(ev))
    specs = [CoderSpec(f"tc-{name}-lr{lr:g}", HP, TrainConfig(kind="transcoder", k=32, expansion=8,
                                                             tokens=200_000, batch_size=1024, lr=lr,
                                                             seed=0, **v), out_hookpoint=OUT)
             for name, v in SETTINGS.items() for lr in LRS]
    out = Path("runs/transcoder-settings")
    coders = Trainer(specs, train.widths, out).fit(lambda s: train.batches(1024, seed=0, start_step=s))
    results = {}
    with torch.no_grad():
        for name, coder in coders.items():
            results[name] = float(fvu(coder(x).out, y))
            print(name, round(results[name], 4), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
