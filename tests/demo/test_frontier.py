"""The frontier experiment at a reduced size: every run yields checkpoints with KL and gold reward."""

from __future__ import annotations

import json

import pytest

from preftune.errors import ConfigError
from preftune.experiments.frontier import (
    BEST_OF_N,
    RUNNERS,
    FrontierSettings,
    family,
    frontier_table,
    register_runner,
    run_frontier,
)
from preftune.methods.rl import best_of_n_kl


def test_frontier_points_plot_and_table(tmp_path):
    settings = FrontierSettings.quick(str(tmp_path))
    calls = []

    def fake_runner(world, s, evaluate):  # the hook later methods (PPO, online DPO) use
        calls.append(s.steps)
        return [{"method": "hooked", "step": 1, **{k: evaluate(world.sft)[k] for k in ("kl", "reward")}}]

    register_runner("hooked", fake_runner)
    settings.runs = ["DPO β=0.5", "Preferred-FT", "Online DPO β=0.1", "Iterative DPO β=0.5", BEST_OF_N, "hooked"]
    try:
        points = run_frontier(settings)
    finally:
        RUNNERS.pop("hooked")
    by_method = {m: [p for p in points if p["method"] == m] for m in settings.runs}
    # Iterative DPO: 3 rounds of 12 // 3 = 4 steps; its evaluations count steps over the whole run.
    for method in ("DPO β=0.5", "Preferred-FT", "Online DPO β=0.1", "Iterative DPO β=0.5"):
        steps = [p["step"] for p in by_method[method]]
        assert steps == [0, 6, 12]  # the start (π_ref) and every eval_every steps
        assert by_method[method][0]["kl"] == 0.0 and all(p["kl"] > 0 for p in by_method[method][1:])
    best = by_method[BEST_OF_N]
    assert [p["n"] for p in best] == [1, 2, 4, 8, 16, 32, 64]  # n = 1 is π_ref itself, at KL 0
    assert [p["kl"] for p in best] == [best_of_n_kl(p["n"]) for p in best]
    assert {p["family"] for p in points if p["method"] == "Iterative DPO β=0.5"} == {family("Iterative DPO β=0.5")}
    assert calls == [settings.steps] and by_method["hooked"][-1]["kl"] == 0.0  # π_ref against itself
    assert (tmp_path / "frontier.png").stat().st_size > 0
    saved = json.loads((tmp_path / "points.json").read_text())
    assert saved["points"] == points
    costs = saved["costs"]
    assert costs["Online DPO β=0.1"]["generated_tokens"] > 0 and costs["DPO β=0.5"]["generated_tokens"] == 0
    assert costs["Iterative DPO β=0.5"]["generated_tokens"] > 0 and costs[BEST_OF_N]["generated_tokens"] > 0
    assert all(c["wall_s"] > 0 and c["peak_rss_gib"] >= 0 for c in costs.values())
    assert "| Online DPO β=0.1 |" in (tmp_path / "frontier.md").read_text().split("wall time")[1]
    assert saved["judge"] == "gold_sentiment"
    table = frontier_table(points)
    assert table.count("\n") == 4 + len(settings.runs) - 1 and "| DPO β=0.5 |" in table
    assert table.splitlines()[0].startswith("Mean reward by judge `gold_sentiment`")

    # --resume keeps every run points.json holds and trains only the new ones.
    settings.runs, settings.resume = ["DPO β=0.5", "Unlikelihood α=1"], True
    resumed = run_frontier(settings)
    assert resumed[: len(points)] == points
    assert {p["method"] for p in resumed[len(points):]} == {"Unlikelihood α=1"}
    again = json.loads((tmp_path / "points.json").read_text())["costs"]
    assert again["DPO β=0.5"] == costs["DPO β=0.5"] and set(again) == set(costs) | {"Unlikelihood α=1"}
    settings.steps = 6  # other settings: the earlier points are not comparable
    with pytest.raises(ConfigError, match="steps"):
        run_frontier(settings)


def test_frontier_table_takes_the_best_reward_within_each_budget():
    points = [{"method": "m", "step": s, "kl": kl, "reward": r} for s, kl, r in
              [(0, 0.0, 0.5), (1, 1.5, 0.7), (2, 4.0, 0.9), (3, 9.0, 0.8)]]
    row = frontier_table(points).splitlines()[-1]
    assert row == "| m | 0.500 | 0.700 | 0.700 | 0.900 | 0.900 | 0.900 | 9.00 |"


def test_frontier_table_groups_families_and_gives_each_run_its_cost():
    points = [{"method": m, "family": f, "step": 0, "kl": kl, "reward": r} for m, f, kl, r in
              [("DPO β=0.1", "DPO", 2.0, 0.6), ("SPPO", "rounds", 0.5, 0.7), ("DPO β=1", "DPO", 0.5, 0.55)]]
    costs = {"DPO β=0.1": {"wall_s": 12.4, "peak_rss_gib": 1.234}, "SPPO": {"wall_s": 99.6, "peak_rss_gib": 2.0}}
    rows = frontier_table(points, costs=costs).splitlines()
    assert rows[2].endswith("| wall time (s) | peak RSS (GiB) |")
    assert [row.split(" | ")[0] for row in rows[4:]] == ["| DPO β=0.1", "| DPO β=1", "| SPPO"]  # by family
    assert rows[4].endswith("| 2.00 | 12 | 1.23 |") and rows[6].endswith("| 0.50 | 100 | 2.00 |")
    assert rows[5].endswith("| nan | nan |")  # a run without a measured cost says so


def test_every_run_has_a_family_and_the_rounds_methods_share_one():
    assert {family(label) for label in ("Iterative DPO β=0.5", "SPPO η=50", "RSO γ=0.5 β_rso=0.5")} == {
        "rounds (RSO, SPPO, iterative DPO)"}
    assert family("DPO β=0.1") == "DPO β sweep" != family("IPO β=0.1") and family(BEST_OF_N) != family("PPO")


def _never_trained(*args, **kwargs):
    raise AssertionError("the frontier went past its folder check")


def test_frontier_refuses_a_folder_of_someone_elses_results(tmp_path, monkeypatch, capsys):
    """`preftune experiment frontier --output-dir X` where X holds a user's frontier.md and points.json: refused
    before any work (with or without --resume), both files as they were."""
    from preftune import cli
    from preftune.errors import RunDirError
    from preftune.experiments import frontier

    monkeypatch.setattr(frontier, "build_world", _never_trained)
    (tmp_path / "frontier.md").write_text("# my notes on the frontier\n")
    (tmp_path / "points.json").write_text("[[0.1, 0.5], [1.0, 0.7]]\n")
    for resume in ([], ["--resume"]):
        code = cli.main(["experiment", "frontier", "--quick", "--output-dir", str(tmp_path), *resume])
        assert code == RunDirError.exit_code
        assert f"preftune: {tmp_path} is not a frontier folder (it holds frontier.md, points.json)" in \
            capsys.readouterr().err
    assert (tmp_path / "frontier.md").read_text() == "# my notes on the frontier\n"
    assert (tmp_path / "points.json").read_text() == "[[0.1, 0.5], [1.0, 0.7]]\n"


def test_frontier_resume_over_a_points_json_it_did_not_write_is_a_message(tmp_path, monkeypatch):
    from preftune.experiments import frontier

    monkeypatch.setattr(frontier, "build_world", _never_trained)
    settings = FrontierSettings.quick(str(tmp_path))
    (tmp_path / ".preftune-frontier").write_text("")  # the frontier's folder, whose points.json was replaced since
    (tmp_path / "points.json").write_text('{"points": []}\n')
    settings.resume = True
    with pytest.raises(ConfigError, match="points.json is not the points.json the frontier writes"):
        run_frontier(settings)


def test_frontier_results_from_before_the_marker_are_its_own(tmp_path, monkeypatch):
    from preftune.experiments import frontier

    settings = FrontierSettings.quick(str(tmp_path))
    (tmp_path / "points.json").write_text(json.dumps({"settings": {}, "points": [], "costs": {}}))
    (tmp_path / "frontier.md").write_text("table\n")
    assert frontier.claim_frontier_folder(settings) == tmp_path
    assert (tmp_path / frontier.FRONTIER_MARKER).exists()


def test_frontier_writes_to_a_run_folder_by_default_never_over_the_committed_results(tmp_path, monkeypatch, capsys):
    """`preftune experiment frontier` from the repository's root: its results and demo world go to runs/frontier
    (ignored by git), not to the committed experiments/frontier."""
    from preftune import cli
    from preftune.experiments import frontier

    given = []
    monkeypatch.setattr(frontier, "run_frontier", lambda settings: given.append(settings) or [])
    monkeypatch.setattr(frontier, "frontier_table", lambda points: "table")
    monkeypatch.chdir(tmp_path)
    for quick in ([], ["--quick"]):
        assert cli.main(["experiment", "frontier", *quick]) == 0
    assert [(s.output_dir, s.world.output_dir) for s in given] == [("runs/frontier", "runs/frontier/work")] * 2
    assert (FrontierSettings().output_dir, FrontierSettings().world.output_dir) == ("runs/frontier",
                                                                                    "runs/frontier/work")
    assert FrontierSettings.full("elsewhere").world.output_dir == "elsewhere/work"  # --output-dir moves it all
    assert list(tmp_path.iterdir()) == []


def test_each_experiment_has_its_own_help(capsys):
    from preftune import cli

    helps = {}
    for name in ("frontier", "scorer"):
        with pytest.raises(SystemExit) as done:
            cli.main(["experiment", name, "--help"])
        assert done.value.code == 0
        helps[name] = " ".join(capsys.readouterr().out.split())
    assert helps["frontier"].startswith("usage: preftune experiment frontier")
    assert "--runs LABEL" in helps["frontier"] and "--resume" in helps["frontier"]
    assert "(default: runs/frontier)" in helps["frontier"]
    assert helps["scorer"].startswith("usage: preftune experiment scorer")
    assert "--runs" not in helps["scorer"] and "--resume" not in helps["scorer"]
    assert "(default: runs/scorer)" in helps["scorer"]
