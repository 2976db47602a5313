"""`preftune experiment claims --quick`: every planned run at every seed, the table's numbers recomputed from
runs.json as stated (reward at a KL budget interpolated per seed, the setting chosen on validation, its test
interval over seeds), and --resume adding seeds without rerunning the rest."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from preftune.cli import main
from preftune.experiments.claims import ClaimsSettings, plan


def _first_crossing(points: list[tuple[float, float]], budget: float) -> float | None:
    """Written again here on purpose: the reward where the KL first reaches the budget."""
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k0 < budget <= k1:
            return r0 + (r1 - r0) * (budget - k0) / (k1 - k0)
    return None


def _recomputed(record: dict, method: str, budget: float) -> tuple[str, float, float] | None:
    by_setting: dict[str, list] = {}
    for run in record["runs"].values():
        if run.get("method") == method:
            kls = [p["kl"] for p in run["trajectory"]]
            by_setting.setdefault(run["setting"], []).append(
                (_first_crossing(list(zip(kls, [p["validation"] for p in run["trajectory"]])), budget),
                 _first_crossing(list(zip(kls, [p["test"] for p in run["trajectory"]])), budget)))
    complete = {s: v for s, v in by_setting.items() if all(val is not None for val, _ in v)}
    if not complete:
        return None
    best = max(complete, key=lambda s: sum(val for val, _ in complete[s]) / len(complete[s]))
    tests = [t for _, t in complete[best]]
    mean = sum(tests) / len(tests)
    sd = math.sqrt(sum((t - mean) ** 2 for t in tests) / (len(tests) - 1))
    return best, mean, {3: 4.303, 4: 3.182}[len(tests)] * sd / math.sqrt(len(tests))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims") / "claims"
    assert main(["experiment", "claims", "--quick", "--output-dir", str(out)]) == 0
    return out


def test_every_planned_run_ran_at_every_seed_and_the_table_is_recomputed_from_its_points(quick):
    record = json.loads((quick / "runs.json").read_text())
    planned = plan(ClaimsSettings.quick(str(quick)))
    assert len(planned) == 2 * 2 * 3  # DPO and Online DPO × two β × three seeds
    assert {run.key for run in planned} <= set(record["runs"])
    assert sum(run.get("method") == "best-of-n" for run in record["runs"].values()) == 3
    assert not any((quick / "work" / "caches").iterdir())  # each run's own cache, removed after it
    for run in record["runs"].values():
        assert run["trajectory"][0]["kl"] == 0.0  # every run starts at π_ref
        assert all(p["validation_half"] > 0 for p in run["trajectory"])  # each point carries its own interval
    table = (quick / "claims.md").read_text()
    rows: dict[str, str] = {}
    for line in table.splitlines():  # the first table's rows (the second one has the same methods)
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    checked = 0
    for method in ("DPO", "Online DPO", "best-of-n"):
        cells = rows[method].strip("| ").split(" | ")[2:]
        for budget, cell in zip(record["kl_budgets"], cells):
            want = _recomputed(record, method, budget)
            if want is None:
                assert cell == "–"
                continue
            mean, half = map(float, re.fullmatch(r"(\S+) ± (\S+)", cell).groups())
            assert mean == pytest.approx(want[1], abs=5e-4) and half == pytest.approx(want[2], rel=1e-3, abs=1e-3)
            checked += 1
    assert checked >= 4  # the quick world reaches several budgets


def test_resume_adds_a_seed_without_rerunning_the_others(quick, tmp_path):
    earlier = json.loads((quick / "runs.json").read_text())
    before = earlier["runs"]
    assert main(["experiment", "claims", "--quick", "--output-dir", str(quick), "--resume",
                 "--seeds", "0", "1", "2", "3"]) == 0
    record = json.loads((quick / "runs.json").read_text())
    after = record["runs"]
    assert {k: after[k] for k in before} == before  # kept, not rerun
    # the experiment's wall time adds this invocation to the earlier ones: at least the new runs' own time
    added = sum(after[k]["wall_s"] for k in after if k not in before and "wall_s" in after[k])
    assert record["seconds"] >= earlier["seconds"] + added - 0.2
    assert sorted(set(after) - set(before)) == sorted(
        [f"{m} | lr=0.0006, beta={b} | seed 3" for m in ("DPO", "Online DPO") for b in ("0.1", "0.5")]
        + ["best-of-n | n ≤ 64 | seed 3"])
    assert "± " in (quick / "claims.md").read_text()


def test_resume_refuses_other_settings_and_a_folder_that_is_not_its_own(quick, tmp_path, capsys):
    from preftune.errors import ConfigError, RunDirError
    from preftune.experiments.claims import run_claims

    settings = ClaimsSettings.quick(str(quick))
    settings.steps, settings.resume = 13, True
    with pytest.raises(ConfigError, match="written under other settings \\(steps differ\\)"):
        run_claims(settings)
    moved = tmp_path / "moved"  # the same experiment, its π_ref rebuilt differently (another CPU, say)
    shutil.copytree(quick, moved)
    record = json.loads((moved / "runs.json").read_text())
    assert len(record["stages"]["reference_sha256"]) == 64
    record["stages"]["reference_sha256"] = "0" * 64
    (moved / "runs.json").write_text(json.dumps(record))
    settings = ClaimsSettings.quick(str(moved))
    settings.resume = True
    with pytest.raises(ConfigError, match="was measured from another π_ref .* resume on the machine it began on"):
        run_claims(settings)
    before = (quick / "runs.json").read_text()
    with pytest.raises(RunDirError, match="runs of an earlier invocation: pass --resume to continue it, or "
                                          "--overwrite"):
        run_claims(ClaimsSettings.quick(str(quick)))  # neither: hours of runs are not dropped
    assert (quick / "runs.json").read_text() == before
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(RunDirError, match="is not this experiment's folder"):
        run_claims(ClaimsSettings.quick(str(tmp_path)))
    assert (tmp_path / "mine.txt").read_text() == "a user's file"


def test_compute_charges_each_method_the_shared_stages_it_needs(quick):
    """The offline losses need the SFT model and π_ref's labelled pairs; online methods the SFT model only (they
    sample and judge inside their run). The table's total is the training seconds plus that charge."""
    from preftune.experiments.claims import charged_seconds, claims_table

    record = json.loads((quick / "runs.json").read_text())
    stages = record["stages"]
    assert stages["sft"] > 0 and stages["pairs"] > 0
    runs = {run["method"]: run for run in record["runs"].values() if "method" in run}
    assert charged_seconds(record, runs["DPO"]) == pytest.approx(stages["sft"] + stages["pairs"])
    assert charged_seconds(record, runs["Online DPO"]) == pytest.approx(stages["sft"])
    # the quick run's three seeds (a resume in another test may have added a fourth)
    first = record | {"runs": {k: r for k, r in record["runs"].items() if r.get("seed", 0) < 3}}
    table = claims_table(first).split("with SFT, pairs, RM |")[1]
    checked = 0
    for line in table.splitlines():
        cells = line.strip("| ").split(" | ")
        if len(cells) == 6 and "±" in cells[4]:
            training, total = (float(cell.split(" ± ")[0]) for cell in cells[4:6])
            # the cells are shown to 0.1 s
            assert total - training == pytest.approx(charged_seconds(record, runs[cells[0]]), abs=0.11)
            checked += 1
    assert checked >= 1


def test_a_planted_difference_is_found_and_a_noise_only_copy_is_not(quick):
    """On the quick run's points: a copy of DPO's runs raised by 0.3 on every evaluation stands above DPO wherever
    both reach a budget; a copy whose seeds are DPO's own, relabelled, never differs from it."""
    from preftune.experiments.claims import differences, selections

    record = json.loads((quick / "runs.json").read_text())
    planted = {}
    for key, run in record["runs"].items():
        if run.get("method") == "DPO":
            raised = [p | {"validation": p["validation"] + 0.3, "test": p["test"] + 0.3} for p in run["trajectory"]]
            planted[f"raised {key}"] = run | {"method": "DPO raised", "trajectory": raised}
            planted[f"copy {key}"] = run | {"method": "DPO copy"}
    record["runs"] |= planted
    seen = 0
    for budget in record["kl_budgets"]:
        verdicts = {method: verdict for method, verdict, _ in differences(selections(record, budget))}
        if "DPO raised" in verdicts:
            assert verdicts["DPO raised"] == "above" and verdicts["DPO copy"] == "no difference"
            seen += 1
    assert seen >= 1


def test_the_verdicts_are_read_from_the_numbers(quick):
    """With Online DPO's runs standing in for PPO's, each verdict sentence carries the two selections' intervals
    and the compute ratio of their charged CPU seconds, at the highest budget both reach."""
    from preftune.experiments.claims import costs, selections, verdicts

    record = json.loads((quick / "runs.json").read_text())
    record["runs"] = {k: r for k, r in record["runs"].items() if r.get("seed", 0) < 3}
    record["stages"]["reward model"] = 100.0  # charged to PPO with a learned reward, on top of the SFT and pairs
    record["runs"] |= {f"ppo {k}": r | {"method": "PPO", "family": "PPO (RLHF)", "config": r["config"] | {
        "method": "ppo", "judge": "learned"}} for k, r in record["runs"].items() if r.get("method") == "Online DPO"}
    lines = verdicts(record, rlhf=("PPO",))
    reward = next(line for line in lines if line.startswith("- **Reward at equal KL"))
    for budget in record["kl_budgets"]:
        chosen = selections(record, budget)
        if chosen["DPO"] and chosen["PPO"]:
            assert f"KL {budget:g}: DPO {chosen['DPO'].test} " in reward and f"PPO {chosen['PPO'].test}" in reward
    both = max(b for b in record["kl_budgets"]
               if b <= 3 and selections(record, b)["DPO"] and selections(record, b)["PPO"])
    compute = next(line for line in lines if line.startswith("- **Compute"))
    picked = selections(record, both)
    (_, dpo), (ppo_training, ppo) = (costs(record, m, picked[m].setting, both) for m in ("DPO", "PPO"))
    assert f"Compute to reach KL {both:g}" in compute and f"×{ppo.mean / dpo.mean:.2f}" in compute
    stages = record["stages"]
    assert ppo.mean - ppo_training.mean == pytest.approx(stages["sft"] + stages["pairs"] + 100.0)
    # stability: both spreads with their χ² intervals, a word only where those separate
    stability = next(line for line in lines if line.startswith("- **Stability"))
    (dpo_low, dpo_high), (low, high) = picked["DPO"].spread_interval, picked["PPO"].spread_interval
    word = ("no different" if dpo_low <= high and low <= dpo_high
            else "more stable" if picked["DPO"].seed_spread < picked["PPO"].seed_spread else "less stable")
    assert f"spread over seeds {picked['DPO'].seed_spread:.3f} ({dpo_low:.3f}–{dpo_high:.3f})" in stability
    assert f": DPO {word};" in stability
