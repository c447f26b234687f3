"""`make bench` on the small preset: the figures it prints and writes."""

from __future__ import annotations

import json

from sar_exp.bench import main


def test_bench_prints_throughput_and_epoch_time_per_method(tmp_path, capsys):
    figures = tmp_path / "bench.json"
    main(["--preset", "small", "--steps", "6", "--backbones", "mlp", "din",
          "--methods", "base", "clardrec", "--cache", str(tmp_path), "--json", str(figures)])  # fmt: skip
    out = capsys.readouterr().out
    assert "clardrec  din              n/a" in out  # ClardRec has no DIN variant
    results = json.loads(figures.read_text())
    assert sorted(results["training"]) == ["base/din", "base/mlp", "clardrec/mlp"]
    mlp = results["training"]["clardrec/mlp"]
    assert mlp["samples/s"] > 0 and 0.0 <= mlp["data wait share"] < 1.0
    # one epoch = the training set's steps at the measured speed
    assert abs(mlp["epoch minutes"] - mlp["steps/epoch"] * mlp["ms/step"] / 60_000) < 1e-9
    assert results["rows"]["users"] > 0 and results["preprocessing"]["total"] > 0
