"""Smoke test of ``benchmarks/callbacks.py --text --quick``: the text classifier's table has one row per callback
that applies to token models, each with a finite positive cost in training steps and epoch shares that are that
cost over the epoch's steps."""

from __future__ import annotations

import importlib
import math
import os
import re
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_text_mode_prints_a_row_per_callback_with_a_finite_positive_cost(capsys):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    bench = importlib.import_module("benchmarks.callbacks")
    threads = torch.get_num_threads()
    try:
        bench.main(["--text", "--quick"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "training steps of TextClassifier (32 tokens" in out
    assert f"SST-2-sized epoch ({bench.SST2_STEPS} steps)" in out and bench.SST2_STEPS == 2105
    assert f"AG-News-sized epoch ({bench.AG_NEWS_STEPS} steps)" in out and bench.AG_NEWS_STEPS == 3750
    names = list(bench.text_factories(["w"]))
    assert len(names) == 3 and not any(n.startswith(("SanityCheck", "ClassPrototypes")) for n in names)
    rows = {}
    for line in out.splitlines():
        match = re.match(r"\| (.+?) \| ([\d.e+-]+) \[[^]]+\] \| (\d+) MB \| ([\d.]+) % \| ([\d.]+) % \|$", line)
        if match:
            rows[match.group(1)] = [float(g) for g in match.groups()[1:]]
    assert sorted(rows) == sorted(names), out
    for name, (ratio, memory, sst2, ag_news) in rows.items():
        assert math.isfinite(ratio) and ratio > 0, (name, ratio)
        assert memory >= 0
        assert abs(sst2 - 100 * ratio / bench.SST2_STEPS) <= 0.01, (name, sst2)
        assert abs(ag_news - 100 * ratio / bench.AG_NEWS_STEPS) <= 0.01, (name, ag_news)
