"""Sweeps (evaluate/sweep.py): grid, frontier, files, and the fitted rule on synthetic results."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from conftest import make_lm, sample_documents
from monosemantic.evaluate.sweep import (HyperRule, SweepGrid, apply_rule, check_rule, fit_rule,
                                         fit_rule_files, grid_specs, load_rule, pareto_frontier,
                                         run_sweep)
from monosemantic.train import TrainConfig


def test_pareto_frontier_keeps_only_undominated_points():
    pts = [(10, 0.5), (20, 0.3), (15, 0.6), (40, 0.3), (40, 0.1), (5, float("nan"))]
    assert pareto_frontier(pts) == [0, 1, 4]
    near = [(63.99, 0.43), (64.0, 0.38), (16.0, 0.5)]  # 63.99 is no sparser than 64
    assert pareto_frontier(near) == [0, 1, 2] and pareto_frontier(near, x_tol=0.01) == [1, 2]


def test_grid_names_every_combination_once():
    specs = grid_specs(["a", "b:input"], TrainConfig(), SweepGrid([64, 128], [4, 8], [1.0], [1e-3, 0.0]))
    assert len(specs) == 2 * 2 * 2 * 2 and len({s.name for s in specs}) == 16
    assert {(s.config.n_features, s.config.k, s.config.lr) for s in specs if s.hookpoint == "a"} == \
        {(w, k, lr) for w in (64, 128) for k in (4, 8) for lr in (1e-3, 0.0)}
    pen = grid_specs(["a"], TrainConfig(activation="relu", coef=1.0), SweepGrid([64], [4], [0.5, 2.0], [0.0]))
    assert [s.config.coef for s in pen] == [0.5, 2.0]
    with pytest.raises(ValueError, match="widths is empty"):
        SweepGrid(widths=[])


def _synthetic_rows():
    """Rows whose FVU is exactly quadratic in log LR around lr* = 0.03 w^-0.5 l0^0.25 d^-0.2, and
    whose L0 follows coef = 40 w^0.1 l0^-1.2 d^0.5 (so the rule should read these back)."""
    rows = []
    for d in (256, 576, 1024):
        for w in (1024, 4096, 16384):
            for coef in (0.5, 1.0, 2.0, 4.0):
                l0 = (coef / (40 * w ** 0.1 * d ** 0.5)) ** (1 / -1.2)
                best = 0.03 * w ** -0.5 * l0 ** 0.25 * d ** -0.2
                for lr in (best / 4, best / 2, best * 1.3, best * 3):
                    rows.append({"hookpoint": f"h{d}", "n_features": w, "d_model": d, "coef": coef,
                                 "lr": lr, "l0": l0, "fvu": 0.1 + 0.05 * math.log(lr / best) ** 2})
    return rows


def test_fitted_rule_recovers_the_planted_laws(tmp_path):
    rule = fit_rule(_synthetic_rows())
    assert (rule.lr.b, rule.lr.c, rule.lr.d) == pytest.approx((-0.5, 0.25, -0.2), abs=1e-6)
    assert rule.lr(4096, 30, 576) == pytest.approx(0.03 * 4096 ** -0.5 * 30 ** 0.25 * 576 ** -0.2, rel=1e-6)
    assert (rule.coef.b, rule.coef.c, rule.coef.d) == pytest.approx((0.1, -1.2, 0.5), abs=1e-6)
    path = tmp_path / "rule.json"
    rule.save(path)
    assert HyperRule.load(path) == rule
    # from files, one per hookpoint; a covariate that never varies is fixed at exponent 0
    rows = [r for r in _synthetic_rows() if r["d_model"] == 576]
    (tmp_path / "s.json").write_text(json.dumps({"rows": rows}))
    one = fit_rule_files([tmp_path / "s.json"])
    assert one.lr.fixed == ("d_model",) and one.lr.d == 0.0
    assert one.lr(4096, 30, 576) == pytest.approx(rule.lr(4096, 30, 576), rel=1e-6)


def test_rule_check_reports_the_distance_to_each_swept_best():
    rows = _synthetic_rows()
    check = check_rule(rows, fit_rule(rows))
    assert len(check) == 3 * 3 * 4  # one per (hookpoint, width, coef)
    for c in check:  # the planted law is exact: the rule lands on the best, at the best FVU
        assert c["rule / best"] == pytest.approx(1.0, rel=1e-6)
        lo, hi = 0.1 + 0.05 * math.log(2) ** 2, 0.1 + 0.05 * math.log(1.3) ** 2  # grid: best/2, 1.3 best
        t = math.log(2) / math.log(2.6)
        assert c["fvu at rule lr"] == pytest.approx(lo + t * (hi - lo), rel=1e-6)
        assert c["best fvu"] == pytest.approx(hi)
    off = HyperRule(dataclasses.replace(fit_rule(rows).lr, a=fit_rule(rows).lr.a + math.log(2)), None)
    for c in check_rule(rows, off):  # a rule 2x too high: ratio 2, a worse loss, or off the grid
        assert c["rule / best"] == pytest.approx(2.0, rel=1e-6)
        assert math.isnan(c["fvu at rule lr"]) or c["fvu at rule lr"] > c["best fvu"]


def test_sweep_trains_the_grid_in_one_pass_and_writes_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tmp_path / "cache"))
    lm = make_lm("llama")
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n\n".join(sample_documents(400, seed=2)))
    base = TrainConfig(tokens=2048, batch_size=256, checkpoint_every=1000)
    grid = SweepGrid(widths=[32, 64], ks=[2, 8], coefs=[1.0], lrs=[1e-3])
    rows = run_sweep(lm, str(text_file), ["model.layers.1"], base, grid, tmp_path / "sweep",
                     eval_tokens=512, ctx_len=32, progress=False)
    assert len(rows) == 4
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["frontier_on"] == ["l0", "fvu"] and len(saved["rows"]) == 4
    assert all(r["l0"] <= r["k"] + 1e-6 for r in rows)
    assert any(r["frontier"] for r in rows)
    front = [r for r in rows if r["frontier"]]
    for r in rows:  # no frontier coder is beaten on both axes
        assert not any(o["l0"] <= r["l0"] and o["fvu"] < r["fvu"] for o in rows) or not r["frontier"]
    assert (tmp_path / "sweep" / "pareto.png").stat().st_size > 1000
    assert all(r["coder"] in (tmp_path / "sweep" / "sweep.md").read_text() for r in front)


def test_target_l0_takes_k_lr_and_coefficient_from_the_rule(tmp_path):
    rule = fit_rule(_synthetic_rows())
    path = tmp_path / "rule.json"
    rule.save(path)
    rule = load_rule(path)
    topk, chosen = apply_rule(TrainConfig(expansion=8), rule, 31.6, 576)
    assert topk.k == 32 and chosen["width"] == 8 * 576
    assert topk.lr == pytest.approx(0.03 * 4608 ** -0.5 * 31.6 ** 0.25 * 576 ** -0.2, rel=1e-3)
    assert apply_rule(TrainConfig(expansion=8, lr=1e-3), rule, 32, 576)[0].lr == 1e-3  # given: kept
    relu, chosen = apply_rule(TrainConfig(activation="relu", n_features=4096, coef=1.0), rule, 20, 256)
    assert relu.coef == pytest.approx(40 * 4096 ** 0.1 * 20 ** -1.2 * 256 ** 0.5, rel=1e-3)
    with pytest.raises(ValueError, match="no coefficient law"):
        apply_rule(TrainConfig(activation="relu", coef=1.0), HyperRule(rule.lr, None), 20, 256)
    with pytest.raises(FileNotFoundError, match="--fit-rule"):
        load_rule(tmp_path / "missing.json")


def test_train_command_with_a_target_l0(tiny_model_folder, text_file, tmp_path, monkeypatch):
    from monosemantic.cli import main

    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tmp_path / "cache"))
    fit_rule(_synthetic_rows()).save(tmp_path / "rule.json")
    assert main(["train", str(tiny_model_folder), str(text_file), "--hookpoints", "model.layers.1",
                 "--n-features", "64", "--target-l0", "6", "--rule", str(tmp_path / "rule.json"),
                 "--tokens", "1024", "--batch-size", "256", "--eval-tokens", "0",
                 "--out", str(tmp_path / "run")]) == 0
    cfg = json.loads((tmp_path / "run" / "run.json").read_text())["coders"][0]["config"]
    assert cfg["k"] == 6
    assert cfg["lr"] == pytest.approx(0.03 * 64 ** -0.5 * 6 ** 0.25 * 32 ** -0.2, rel=1e-3)


def test_the_shipped_rule_loads_and_chooses_a_plausible_lr():
    from monosemantic.evaluate.sweep import DEFAULT_RULE

    rule = load_rule()  # no path: the package's default
    assert DEFAULT_RULE.exists() and rule.lr is not None and rule.lr.n >= 9
    assert {h for f in rule.fitted_on for h in f["hookpoints"]} >= {"model.layers.5", "model.layers.15"}
    cfg, chosen = apply_rule(TrainConfig(expansion=8), rule, 32, 576)
    assert cfg.k == 32 and 1e-4 < cfg.lr < 1e-2  # inside the swept range (5e-4 .. 4.5e-3), roughly
    if rule.coef is None:
        with pytest.raises(ValueError, match="no coefficient law"):
            apply_rule(TrainConfig(activation="relu", coef=1.0), rule, 32, 576)
