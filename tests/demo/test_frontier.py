"""The frontier experiment at a reduced size: every run yields checkpoints with KL and gold reward."""

from __future__ import annotations

import json

from preftune.experiments.frontier import RUNNERS, FrontierSettings, frontier_table, register_runner, run_frontier


def test_frontier_points_plot_and_table(tmp_path):
    settings = FrontierSettings.quick(str(tmp_path))
    calls = []

    def fake_runner(world, s, evaluate):  # the hook later methods (PPO, online DPO) use
        calls.append(s.steps)
        return [{"method": "hooked", "step": 1, **{k: evaluate(world.sft)[k] for k in ("kl", "reward")}}]

    register_runner("hooked", fake_runner)
    settings.runs = ["DPO β=0.5", "Preferred-FT", "Online DPO β=0.1", "hooked"]
    try:
        points = run_frontier(settings)
    finally:
        RUNNERS.pop("hooked")
    by_method = {m: [p for p in points if p["method"] == m] for m in settings.runs}
    for method in ("DPO β=0.5", "Preferred-FT", "Online DPO β=0.1"):
        steps = [p["step"] for p in by_method[method]]
        assert steps == [0, 6, 12]  # the start (π_ref) and every eval_every steps
        assert by_method[method][0]["kl"] == 0.0 and all(p["kl"] > 0 for p in by_method[method][1:])
    assert calls == [settings.steps] and by_method["hooked"][-1]["kl"] == 0.0  # π_ref against itself
    assert (tmp_path / "frontier.png").stat().st_size > 0
    saved = json.loads((tmp_path / "points.json").read_text())
    assert saved["points"] == points
    costs = saved["costs"]
    assert costs["Online DPO β=0.1"]["generated_tokens"] > 0 and costs["DPO β=0.5"]["generated_tokens"] == 0
    assert all(c["wall_s"] > 0 and c["peak_rss_gib"] >= 0 for c in costs.values())
    assert "| Online DPO β=0.1 |" in (tmp_path / "frontier.md").read_text().split("wall time")[1]
    assert saved["judge"] == "gold_sentiment"
    table = frontier_table(points)
    assert table.count("\n") == 4 + len(settings.runs) - 1 and "| DPO β=0.5 |" in table
    assert table.splitlines()[0].startswith("Mean reward by judge `gold_sentiment`")


def test_frontier_table_takes_the_best_reward_within_each_budget():
    points = [{"method": "m", "step": s, "kl": kl, "reward": r} for s, kl, r in
              [(0, 0.0, 0.5), (1, 1.5, 0.7), (2, 4.0, 0.9), (3, 9.0, 0.8)]]
    row = frontier_table(points).splitlines()[-1]
    assert row == "| m | 0.500 | 0.700 | 0.700 | 0.900 | 0.900 | 0.900 | 9.00 |"
