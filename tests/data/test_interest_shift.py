"""QueryRec's data analysis (Sec. 5.2): JS divergence of search and rec interests, the
cross-domain correlation ratios, and the command that prints them."""

from __future__ import annotations

import numpy as np
import pytest

from sar_exp.data.canonical import load_canonical
from sar_exp.data.interest_shift import correlation_ratios, js_divergence, user_shift
from sar_exp.data.synthetic import make_config, write_kuaisar_folder
from tests.conftest import TINY

USER_ATTRS = ["search_active_level", "rec_active_level"]
ITEM_ATTRS = ["first_level_category_id", "author_id"]


def test_js_divergence_is_bounded_by_one_in_base_two():
    same = np.array([[0.5, 0.5, 0.0]])
    disjoint = np.array([[0.0, 0.0, 1.0]])
    assert js_divergence(same, same)[0] == pytest.approx(0.0)
    assert js_divergence(same, disjoint)[0] == pytest.approx(1.0)
    half = js_divergence(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]]))[0]
    # 0.5 KL([1,0] || [.75,.25]) + 0.5 KL([.5,.5] || [.75,.25]) in bits
    expected = 0.5 * np.log2(1 / 0.75) + 0.5 * (
        0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25)
    )
    assert half == pytest.approx(expected)


def _frames(tmp_path, **knobs):
    folder = write_kuaisar_folder(make_config("small", **{**TINY, **knobs}), tmp_path / "data")
    tables = load_canonical(folder, tmp_path / "cache", USER_ATTRS, ITEM_ATTRS)
    search = tables.search.join(tables.sessions.select("session", "user", "time"), on="session")
    return tables, tables.rec, search


def test_the_planted_interest_overlap_moves_the_shift(tmp_path):
    """interest_overlap is the embedded data's interest shift: fully shared interests
    give smaller divergences than disjoint ones."""
    shared = user_shift(*_frames(tmp_path / "a", interest_overlap=1.0))
    apart = user_shift(*_frames(tmp_path / "b", interest_overlap=0.0))
    assert shared.size > 50 and apart.size > 50
    assert apart.mean() > shared.mean() + 0.2
    assert ((shared >= 0) & (shared <= 1)).all()


def test_correlation_ratios_rise_with_shared_interests(tmp_path):
    """R1 and R2 (Eq. 22, 24) compare how often a rec click's category was among the
    user's earlier search impressions with chance; sharing interests raises both."""
    r1_shared, r2_shared, used = correlation_ratios(*_frames(tmp_path / "a", interest_overlap=1.0))
    r1_apart, r2_apart, _ = correlation_ratios(*_frames(tmp_path / "b", interest_overlap=0.0))
    assert used > 100
    assert r1_shared > r1_apart and r2_shared > r2_apart


def test_the_stats_command_prints_the_analysis_and_saves_the_histogram(tmp_path, capsys):
    from sar_exp.data.stats import main

    png = tmp_path / "fig2.png"
    main([f"paths.cache_dir={tmp_path / 'cache'}", *[f"+dataset.synthetic.{k}={v}" for k, v in TINY.items()],
          "--interest-shift", "--png", str(png)])  # fmt: skip
    out = capsys.readouterr().out
    assert "share of users with JS >= 0.5" in out and "R1_corr" in out and "R2_corr" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
