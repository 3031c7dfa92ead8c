"""The CLI of issue O1.4: train --loss e2e on attention heads, eval with pursuit and head reports,
sweep and its fitted rule; on the tiny Llama saved to a folder."""

from __future__ import annotations

import json

import pytest

from conftest import sample_documents
from monosemantic.cli import main


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(sample_documents(400, seed=5)))
    return str(path)


def test_train_e2e_on_attention_heads_then_eval_with_pursuit(tiny_model_folder, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(tiny_model_folder), corpus, "--hookpoints", "attn.1", "--loss", "e2e+ds",
               "--ds-coef", "0.5", "--tokens", "1024", "--batch-size", "128", "--expansion", "2",
               "-k", "4", "--ctx-len", "32", "--eval-tokens", "256", "--out", str(out)])
    assert rc == 0
    name = "model.layers.1.self_attn.o_proj@input"
    run = json.loads((out / "run.json").read_text())
    assert run["objective"] == {"loss": "e2e+ds", "kl_coef": 1.0, "ds_coef": 0.5, "kl_finetune_frac": 0.0}
    final = json.loads((out / name / "training.json").read_text())["final"]
    assert {"kl", "ds"} <= set(final)
    heads = json.loads((out / name / "heads.json").read_text())
    assert heads["written"] == "heads" and len(heads["shares"][0]) == 4
    assert "head attribution of" in capsys.readouterr().out
    assert main(["eval", str(out), "--tokens", "128", "--ctx-len", "32", "--no-splice",
                 "--inference", "gp", "--l0", "3"]) == 0
    pursued = json.loads((out / name / "metrics-gp-l03.json").read_text())
    assert pursued["l0"] <= 3 + 1e-6
    assert main(["eval", str(out), "--tokens", "128", "--inference", "gp"]) == 2  # no --l0


def test_sweep_then_fit_rule(tiny_model_folder, corpus, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", str(tiny_model_folder), corpus, "--hookpoints", "model.layers.1",
                 "--widths", "32", "64", "--ks", "2", "6", "--lrs", "1e-3", "4e-3", "1.6e-2",
                 "--tokens", "1024", "--batch-size", "256", "--ctx-len", "32", "--eval-tokens", "256",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert len(rows) == 12 and any(r["frontier"] for r in rows)
    assert "frontier:" in capsys.readouterr().out
    assert main(["sweep", "--fit-rule", str(out / "sweep.json"), "--out", str(tmp_path / "rule")]) == 0
    rule = json.loads((tmp_path / "rule" / "rule.json").read_text())
    assert rule["lr"]["n"] == 4 and "d_model" in rule["lr"]["fixed"]


def test_every_command_prints_its_help(capsys):
    """argparse %-formats each option's help (taken from the docstrings): a stray '%' breaks it.
    simple_parsing adds a command's options only when it parses, so `--help` goes the user's way."""
    import argparse

    from monosemantic.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "eval", "sweep", "toy"} <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([name, "--help"])
        text = capsys.readouterr().out
        assert done.value.code == 0 and text.startswith("usage: monosemantic " + name), name
        if name == "train":  # the options themselves, not just the usage line
            assert "--grad-clip" in text and "--calibrate-init" in text and "--lr-warmup" in text
