"""Facts about the health checks: each warns on a crafted stream that shows its failure, with the evidence and the
step, and stays quiet on a healthy stream; the live monitor warns once per check; Gao et al.'s fits recover their
coefficients; the loop's batch metrics carry the lengths and the margin–length correlation the checks read."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from preftune.health import (
    CHECKS,
    NO_DATA,
    OK,
    WARNING,
    HealthMonitor,
    RunContext,
    Thresholds,
    fit_gao,
    run_checks,
)
from preftune.training.health import HealthCallback

BETA = 0.1
CTX = RunContext(beta=BETA, learning_rate=3e-4, methods=("dpo",))
STEPS = range(10, 201, 10)  # 20 training records, logging_steps=10


def healthy(**changes) -> list[dict]:
    """A DPO run that is fine: log-ratios drift a little, accuracy 0.5 → 0.8, gold reward rises and levels off,
    length and EOS rate stay put. ``changes`` replaces a metric by a function of t ∈ (0, 1] (None removes it);
    keys of held-out (``eval_``) and sample-evaluation records go to those records."""
    funcs = {
        "loss": lambda t: 0.69 - 0.2 * t,
        "rewards/chosen": lambda t: BETA * -2.0 * t,
        "rewards/rejected": lambda t: BETA * -8.0 * t,
        "logps/chosen": lambda t: -30.0 - 2.0 * t,
        "logps/rejected": lambda t: -31.0 - 8.0 * t,
        "rewards/accuracies": lambda t: 0.5 + 0.3 * t,
        "rewards/margins": lambda t: BETA * 6.0 * t,
        "grad_norm": lambda t: 5.0 - 2.0 * t + 0.3 * math.sin(40 * t),
        "lengths/chosen": lambda t: 10.4,
        "lengths/rejected": lambda t: 9.6,
        "lengths/margin_corr": lambda t: 0.1 * t,
        "eval_loss": lambda t: 0.69 - 0.1 * t,
        "eval_rewards/chosen": lambda t: BETA * -1.0 * t,
        "eval_rewards/rejected": lambda t: BETA * -3.0 * t,
        "eval_rewards/accuracies": lambda t: 0.5 + 0.2 * t,
        "gold_reward": lambda t: 0.48 + 0.4 * (1 - math.exp(-3 * t)),
        "kl_to_ref": lambda t: 4.0 * t * t,
        "length": lambda t: 9.2 * (1 + 0.05 * t),
        "eos_rate": lambda t: 0.99 - 0.03 * t,
        "ref_gold_reward": lambda t: 0.48,
        "ref_length": lambda t: 9.2,
        "ref_eos_rate": lambda t: 0.99,
    }
    funcs.update(changes)
    funcs = {k: f for k, f in funcs.items() if f is not None}
    records = []
    for step in STEPS:
        t = step / STEPS[-1]
        sample = {k: f(t) for k, f in funcs.items() if k in SAMPLE_KEYS}
        if sample and step % 40 == 0:  # a generation callback every 40 steps
            records.append({"step": step, **sample})
        records.append({"step": step, "learning_rate": 3e-4,
                        **{k: f(t) for k, f in funcs.items() if not k.startswith("eval_") and k not in SAMPLE_KEYS}})
        held_out = {k: f(t) for k, f in funcs.items() if k.startswith("eval_")}
        if held_out and step % 50 == 0:  # eval_steps=50
            records.append({"step": step, **held_out})
    return records


SAMPLE_KEYS = {"gold_reward", "kl_to_ref", "length", "eos_rate", "ref_gold_reward", "ref_length", "ref_eos_rate"}


def verdicts(records, ctx=CTX) -> dict:
    return {r.name: r for r in run_checks(records, ctx)}


def test_a_healthy_run_passes_every_check():
    results = verdicts(healthy())
    assert {name: r.status for name, r in results.items()} == {name: OK for name in results}
    monitor = HealthMonitor(CTX)
    assert not any(monitor.update(record) for record in healthy()) and monitor.postfix() == {}


def test_the_chosen_log_prob_falling_by_20_nats_warns():
    # Chosen log π/π_ref: 0 → −20 nats (rewards/chosen = β·ratio), the rejected falling faster still.
    records = healthy(**{"rewards/chosen": lambda t: BETA * -20.0 * t, "rewards/rejected": lambda t: BETA * -35.0 * t,
                         "logps/chosen": lambda t: -30.0 - 20.0 * t, "logps/rejected": lambda t: -31 - 35.0 * t})
    result = verdicts(records)["likelihood"]
    assert result.status == WARNING and result.values["chosen"] == pytest.approx(-20.0)
    assert result.step == 100  # the first record at or below −10 nats
    assert "-20.0 nats" in result.evidence and "rpo" in result.suggestion and "0.1 → 0.2" in result.suggestion
    # Without β the change of logps/chosen since the start (mean of the first two logs, −31.5) tells the same.
    without_beta = verdicts(records, RunContext())["likelihood"]
    assert without_beta.status == WARNING and without_beta.values["chosen"] == pytest.approx(-50.0 + 31.5)
    assert verdicts(healthy())["likelihood"].values["chosen"] == pytest.approx(-2.0)


def test_held_out_responses_losing_likelihood_warn_of_dispersion():
    records = healthy(**{"eval_rewards/chosen": lambda t: BETA * -15.0 * t,
                         "eval_rewards/rejected": lambda t: BETA * -25.0 * t,
                         "eval_loss": lambda t: 0.6 + (t - 0.5) ** 2})
    result = verdicts(records)["dispersion"]
    assert result.status == WARNING and result.values["unseen"] == pytest.approx(-20.0)
    assert result.step == 100 and "stop earlier at step 100" in result.suggestion  # eval_loss is lowest at t = ½
    assert verdicts(healthy(**{k: None for k in ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected",
                                                 "eval_rewards/accuracies")}))["dispersion"].status == NO_DATA


def test_saturated_training_accuracy_warns_with_the_step_to_stop_at():
    records = healthy(**{"rewards/accuracies": lambda t: min(0.6 + t, 0.99),
                         "rewards/margins": lambda t: 10 * t})
    result = verdicts(records)["saturation"]
    assert result.status == WARNING and result.step == 200  # no eval_loss minimum before the end: its last step
    assert "since step 70" in result.evidence and "3.50 → 10.00" in result.evidence  # 0.6 + t ≥ 0.95 from t = 0.35
    one_record = healthy(**{"rewards/accuracies": lambda t: 0.99 if t == 1 else 0.7})
    assert verdicts(one_record)["saturation"].status == OK  # one record at 0.99 is not yet saturation


def test_longer_samples_warn_of_verbosity_with_the_numbers():
    result = verdicts(healthy(length=lambda t: 9.2 + 5.3 * t, **{"lengths/margin_corr": lambda t: 0.4}))["verbosity"]
    assert result.status == WARNING
    assert "9.2 tokens (π_ref) → 14.5 at step 200 (+58%)" in result.evidence
    assert "chosen 10.4 tokens, rejected 9.6 (+0.8)" in result.evidence and "r = +0.40" in result.evidence
    assert result.step == 80 and "ld_alpha" in result.suggestion  # 9.2 + 5.3·0.4 ≥ 1.15 · 9.2 first at step 80
    # No samples: a margin that follows the length difference warns on its own.
    no_samples = {k: None for k in SAMPLE_KEYS}
    assert verdicts(healthy(**no_samples, **{"lengths/margin_corr": lambda t: 0.8 * t}))["verbosity"].status == WARNING
    assert verdicts(healthy(**no_samples))["verbosity"].status == OK


def gao_hump(alpha: float = 0.3, beta: float = 0.25, r0: float = 0.48):
    return lambda t: r0 + (d := 3 * t) * (alpha - beta * math.log(d))


def test_gold_reward_falling_after_its_peak_warns_of_over_optimisation():
    # √KL = 3t; R = R₀ + d(α − β ln d) peaks at d* = e^(α/β − 1) ≈ 1.22, i.e. t ≈ 0.41: the eval at step 80.
    records = healthy(gold_reward=gao_hump(), kl_to_ref=lambda t: 9 * t * t)
    result = verdicts(records)["over_optimisation"]
    assert result.status == WARNING and result.step == 80
    assert result.values["alpha"] == pytest.approx(0.3, abs=1e-9) and result.values["beta"] == pytest.approx(0.25)
    assert "fitted peak at √KL 1.22" in result.evidence and "stop earlier at step 80" in result.suggestion
    assert "training reward margin kept rising" in result.evidence
    # Levelling off is not a hump: a fall within the tolerance (2% of reward, 10% of the gain) is noise, and so is
    # one low evaluation after the peak.
    flat = healthy(gold_reward=lambda t: 0.9 - (0.01 if t == 1 else 0.0))
    assert verdicts(flat)["over_optimisation"].status == OK
    one_dip = healthy(gold_reward=lambda t: 0.5 + 0.4 * t - (0.2 if t == 1 else 0.0))
    assert verdicts(one_dip)["over_optimisation"].status == OK


def test_gao_fits_recover_both_forms():
    d = np.linspace(0.2, 4, 12)
    rl = fit_gao(d, 0.5 + d * (0.4 - 0.2 * np.log(d)), r0=0.5)["rl"]
    assert (rl.alpha, rl.beta) == pytest.approx((0.4, 0.2)) and rl.peak_d == pytest.approx(math.exp(0.4 / 0.2 - 1))
    bon = fit_gao(d, 0.1 + d * (0.6 - 0.1 * d))["bon"]  # R₀ fitted too
    assert (bon.alpha, bon.beta, bon.r0) == pytest.approx((0.6, 0.1, 0.1)) and bon.peak_d == pytest.approx(3.0)
    assert bon.rmse == pytest.approx(0.0, abs=1e-9) and fit_gao([1.0], [0.5]) == {}


def test_samples_that_stop_ending_warn_of_eos_collapse():
    result = verdicts(healthy(eos_rate=lambda t: 0.99 - 0.6 * t))["eos"]
    # Samples every 40 steps: 0.87 at step 40, 0.75 ≤ 0.99 − 0.2 at step 80.
    assert result.status == WARNING and "0.99 (π_ref) → 0.39" in result.evidence and result.step == 80
    collapsed = verdicts(healthy(length=lambda t: 9.2 * (1 - 0.8 * t)))["eos"]
    assert collapsed.status == WARNING and "collapsed" in collapsed.evidence


def test_online_runs_training_samples_stand_in_for_sample_evaluations():
    results = verdicts(healthy(**FAILING_STREAMS["online samples"]))
    # Lengths 9.2 (step 10) → 13.0 (step 200); EOS rate 1 − clipped ratio: 0.975 → 0.5.
    assert results["verbosity"].status == WARNING and "9.2 tokens (step 10) → 13.0" in results["verbosity"].evidence
    assert results["eos"].status == WARNING and "0.97 (step 10) → 0.50" in results["eos"].evidence


def test_a_gradient_norm_spike_warns_at_its_step():
    result = verdicts(healthy(grad_norm=lambda t: 60.0 if t == 0.6 else 4.0))["grad_spikes"]
    assert result.status == WARNING and result.step == 120 and "15× the median 4" in result.evidence
    assert "learning rate (0.0003 → 0.0001)" in result.suggestion


def test_a_non_finite_value_warns_with_its_step_and_name():
    result = verdicts(healthy(loss=lambda t: math.nan if t >= 0.7 else 0.5))["non_finite"]
    assert result.status == WARNING and result.step == 140 and result.evidence.startswith("loss not finite at step 140")


def test_the_live_monitor_warns_once_per_check_and_logs_it(caplog):
    records = healthy(length=lambda t: 9.2 + 5.3 * t, grad_norm=lambda t: 60.0 if t in (0.6, 0.8) else 4.0)
    monitor = HealthMonitor(CTX, Thresholds())
    raised = []
    with caplog.at_level(logging.WARNING, logger="preftune"):
        for record in records:
            raised += [(record["step"], w.name) for w in monitor.update(record)]
    # Verbosity trips at the sample evaluation of step 80 (the first at +15%), grad spikes at step 120; once each.
    assert raised == [(80, "verbosity"), (120, "grad_spikes")]
    assert monitor.postfix() == {"health": "⚠ verbosity,grad_spikes"}
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("health: ")]
    assert len(logged) == 2 and "[verbosity] warning at step 80" in logged[0] and "Suggestion:" in logged[0]
    assert {r.name: r.status for r in monitor.results()}["grad_spikes"] == WARNING


def test_run_context_reads_beta_where_rewards_are_log_ratios():
    from preftune.config import build_config

    assert RunContext.from_config(build_config({"method": "dpo"})).beta == 0.1  # the registry default
    assert RunContext.from_config(build_config({"method": "ipo", "beta": 0.5})).beta == 0.5
    assert RunContext.from_config(build_config({"method": "simpo"})).beta is None  # rewards are averages, no reference
    assert RunContext.from_config(build_config({"method": "reward"})).beta is None


def test_batch_metrics_carry_lengths_and_the_margin_length_correlation(tiny_model, tokenizer):
    from preftune.config import build_config
    from preftune.data.batching import PreferenceCollator
    from preftune.modeling.logprobs import LogProbModel
    from preftune.modeling.reference import PrecomputedReference
    from preftune.training.objective import LossSpec, batch_loss
    from preftune.training.tracking import MetricWindow

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(6):
        chosen = torch.randint(10, 300, (3 + i,), generator=g).tolist()
        rejected = torch.randint(10, 300, (8 - i if i % 2 else 2 + i,), generator=g).tolist()
        rows.append({"prompt_ids": [1, 20 + i], "chosen_ids": chosen, "rejected_ids": rejected,
                     "ref_chosen_logps": -1.0 * i, "ref_rejected_logps": 0.5 * i})
    collate = PreferenceCollator(tokenizer.pad_token_id)
    batch = collate(rows)
    window, split = MetricWindow(), MetricWindow()
    spec = LossSpec.from_config(build_config({"method": "dpo", "beta": 0.1}))
    model = LogProbModel(tiny_model(seed=0))
    with torch.no_grad():
        batch_loss(model, PrecomputedReference(), batch, spec, window)
        for part in (rows[:2], rows[2:]):  # the same pairs in two micro-batches (or on two processes)
            batch_loss(model, PrecomputedReference(), collate(part), spec, split)
    lengths_c = [len(r["chosen_ids"]) for r in rows]
    lengths_r = [len(r["rejected_ids"]) for r in rows]
    one_process = type("OneProcess", (), {"device": torch.device("cpu"), "reduce": lambda self, t, reduction: t})()
    logged, logged_split = window.values(one_process), split.values(one_process)
    assert logged["lengths/chosen"] == pytest.approx(np.mean(lengths_c))
    assert logged["lengths/rejected"] == pytest.approx(np.mean(lengths_r))
    with torch.no_grad():  # the margins of the batch, recomputed, against the length differences
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "score_index",
                                             "score_target", "score_seq", "seq_tokens")})
    logps = out["logps"].numpy()
    ref = np.array([r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows])
    ratio = logps - ref
    margins = 0.1 * (ratio[:6] - ratio[6:])
    expected = np.corrcoef(margins, np.array(lengths_c) - np.array(lengths_r))[0, 1]
    # One correlation over every pair of the window, however they were split; its moments are not logged.
    assert logged["lengths/margin_corr"] == pytest.approx(expected, abs=1e-5)
    assert logged_split["lengths/margin_corr"] == pytest.approx(expected, abs=1e-5)
    assert not [k for k in logged if k.startswith("_")]


FAILING_STREAMS = {
    "likelihood": dict(**{"rewards/chosen": lambda t: BETA * -20.0 * t, "logps/chosen": lambda t: -30.0 - 20.0 * t}),
    "dispersion": dict(**{"eval_rewards/chosen": lambda t: BETA * -15.0 * t,
                          "eval_rewards/rejected": lambda t: BETA * -25.0 * t}),
    "saturation": dict(**{"rewards/accuracies": lambda t: min(0.6 + t, 0.99)}),
    "verbosity": dict(length=lambda t: 9.2 + 5.3 * t),
    "verbosity without samples": dict(**{k: None for k in SAMPLE_KEYS}, **{"lengths/margin_corr": lambda t: 0.8 * t}),
    "over_optimisation": dict(gold_reward=gao_hump(), kl_to_ref=lambda t: 9 * t * t),
    "eos": dict(eos_rate=lambda t: 0.99 - 0.6 * t),
    "eos collapse": dict(length=lambda t: 9.2 * (1 - 0.8 * t)),
    "online samples": {**{k: None for k in SAMPLE_KEYS}, "completions/mean_length": lambda t: 9.0 + 4.0 * t,
                       "completions/clipped_ratio": lambda t: 0.5 * t},
    "grad_spikes": dict(grad_norm=lambda t: 60.0 if t in (0.6, 0.9) else 4.0),
    "non_finite": dict(loss=lambda t: math.nan if t >= 0.7 else 0.5, grad_norm=lambda t: math.inf if t == 1 else 4.0),
}


@pytest.mark.parametrize("stream", ["healthy", *FAILING_STREAMS])
def test_the_live_monitor_warns_where_rerunning_every_check_on_every_record_would(stream):
    # The monitor reruns a check only when a record could trip it; that must not change what warns, or when.
    records = healthy(**FAILING_STREAMS.get(stream, {}))
    monitor, live = HealthMonitor(CTX, log_warnings=False), []
    brute, seen = [], set()
    for i, record in enumerate(records):
        live += [(i, w.name, w.evidence) for w in monitor.update(record)]
        for result in run_checks(records[: i + 1], CTX):
            if result.warning and result.name not in seen:
                seen.add(result.name)
                brute.append((i, result.name, result.evidence))
    assert live == brute
    assert (stream == "healthy") == (live == [])


def test_the_health_callback_warns_once_and_records_the_warning(caplog):
    # The chosen log π/π_ref falls to −20 nats (training records), and the callback sees every record as the loop
    # hands it over (on_log): one warning, logged once, in the summary with its step, evidence and suggestion.
    records = healthy(**FAILING_STREAMS["likelihood"])
    callback = HealthCallback(HealthMonitor(CTX))
    with caplog.at_level(logging.WARNING, logger="preftune"):
        for record in records:
            callback.on_log(record)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("health: ")]
    assert len(logged) == 1 and logged[0].startswith("health: [likelihood] warning at step 100")
    summary = callback.summary()
    assert [w["check"] for w in summary["warnings"]] == ["likelihood"] and summary["records"] == len(records)
    assert summary["warnings"][0]["step"] == 100 and "rpo" in summary["warnings"][0]["suggestion"]
    assert callback.postfix() == {"health": "⚠ likelihood"}
    healthy_callback = HealthCallback(HealthMonitor(CTX))
    for record in healthy():
        healthy_callback.on_log(record)
    assert healthy_callback.summary()["warnings"] == [] and healthy_callback.postfix() == {}


def test_a_resumed_run_replays_its_records_without_warning_again(caplog):
    records = healthy(**FAILING_STREAMS["likelihood"])
    callback = HealthCallback(HealthMonitor(CTX))
    with caplog.at_level(logging.WARNING, logger="preftune"):
        callback.replay(records[:20])  # what metrics.jsonl kept: the warning had tripped before the checkpoint
        for record in records[20:]:
            callback.on_log(record)
    assert not [r for r in caplog.records if r.getMessage().startswith("health: ")]
    assert [w["check"] for w in callback.summary()["warnings"]] == ["likelihood"]
    assert callback.monitor.log_warnings  # replay turned logging off only while it ran


def test_the_live_monitor_stays_cheap_on_a_long_run():
    import time

    monitor = HealthMonitor(CTX, log_warnings=False)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for step in range(1, 5001):  # 5,000 training records, 12 metrics each
        monitor.update({"step": step, "loss": 0.6, "rewards/chosen": -0.1, "rewards/rejected": -0.3,
                        "rewards/margins": 0.2, "rewards/accuracies": 0.7, "logps/chosen": -30.0,
                        "logps/rejected": -33.0, "grad_norm": 1 + rng.random(), "lengths/chosen": 10.0,
                        "lengths/rejected": 9.0, "lengths/margin_corr": 0.1, "learning_rate": 1e-6})
    # Rerunning every check on every record takes minutes here (quadratic); the monitor takes about a second.
    assert time.perf_counter() - started < 20 and monitor.warned == {}
    assert len(CHECKS) == len(monitor.results())


def _run(tmp_path, tokenizer, tiny_model, callbacks, **overrides):
    from preftune import PreferenceTrainer
    from preftune.config import build_config
    from preftune.data.builtin import builtin_preferences

    config = dict(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), max_steps=4,
                  per_device_train_batch_size=4, learning_rate=1e-4, logging_steps=1, disable_tqdm=True, seed=0,
                  bf16=False) | overrides
    rows = builtin_preferences(16, seed=3)
    return PreferenceTrainer(build_config(config), model=tiny_model(seed=0).train(), tokenizer=tokenizer,
                             train_dataset=rows, callbacks=list(callbacks)).train()


def test_a_real_run_warns_once_live_and_records_it_in_the_summary(tmp_path, tokenizer, tiny_model, caplog):
    import json

    # A step callback logs samples that grow 11 → 14 tokens against the reference's 10 (as `preftune demo`'s does):
    # verbosity trips at step 2 (+20% ≥ 15%), and is reported once however long it goes on.
    def samples(step, model):
        return {"length": 10.0 + step, "ref_length": 10.0}

    with caplog.at_level(logging.WARNING, logger="preftune"):
        result = _run(tmp_path, tokenizer, tiny_model, [samples])
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("health: ")]
    health = json.loads((result.output_dir / "summary.json").read_text())["health"]
    warned = [(w["check"], w["step"]) for w in health["warnings"]]
    # (4 pairs a step on 16 rows: the training accuracy may saturate too, as it does; each check once.)
    assert ("verbosity", 2) in warned and len({c for c, _ in warned}) == len(warned) == len(logged)
    assert sum(m.startswith("health: [verbosity] warning at step 2") for m in logged) == 1
    records = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    assert health["records"] == len(records) == 8  # 4 training records and 4 sample records, each seen once
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="preftune"):
        off = _run(tmp_path / "off", tokenizer, tiny_model, [samples], health_checks=False)
    assert "health" not in json.loads((off.output_dir / "summary.json").read_text())
    assert not [r for r in caplog.records if r.getMessage().startswith("health: ")]


def test_a_correlation_with_a_constant_side_is_left_out():
    from preftune.training.tracking import MetricWindow

    window = MetricWindow()
    window.add_correlation("r", torch.zeros(4), torch.tensor([1.0, 2.0, 3.0, 5.0]))  # step 0: every margin is 0
    window.add("loss", torch.ones(2))
    one_process = type("OneProcess", (), {"device": torch.device("cpu"), "reduce": lambda self, t, reduction: t})()
    assert window.values(one_process) == {"loss": 1.0}


# ------------------------------------------------------------------------------------ advice that fits the method

DPO_ONLY_ADVICE = ("ld_alpha", "ipo", "simpo", "method=rpo", "label_smoothing")


def test_a_grpo_run_is_told_what_grpo_can_change():
    from preftune.config import build_config

    # GRPO's training samples grow 9 → 13 tokens and stop ending (clipped ratio 0 → 0.5).
    records = [{"step": s, "loss": 0.01, "grad_norm": 1.0, "completions/mean_length": 9.0 + 4.0 * s / 200,
                "completions/clipped_ratio": 0.5 * s / 200} for s in STEPS]
    monitor = HealthMonitor.from_config(build_config({"method": "grpo"}))
    warned = {w.name: w for record in records for w in monitor.update(record)}
    assert set(warned) == {"verbosity", "eos"}
    for result in warned.values():
        assert not any(option in result.suggestion for option in DPO_ONLY_ADVICE), result.suggestion
        assert "add a KL penalty (beta=0.04)" in result.suggestion  # GRPO's default β = 0: no KL term yet
    assert "judge rewards length" in warned["verbosity"].suggestion
    ppo = RunContext.from_config(build_config({"method": "ppo", "kl_coef": 0.05}))
    assert "raise kl_coef (0.05 → 0.1)" in verdicts(records, ppo)["verbosity"].suggestion


def test_a_reward_model_is_told_what_a_reward_model_can_change():
    from preftune.config import build_config

    ctx = RunContext.from_config(build_config({"method": "reward"}))
    records = [{"step": s, "loss": 0.1, "rewards/accuracies": 0.99, "rewards/margins": 2.0 + s / 100,
                "lengths/chosen": 12.0, "lengths/rejected": 8.0, "lengths/margin_corr": 0.8} for s in STEPS]
    results = verdicts(records, ctx)
    saturation, verbosity = results["saturation"], results["verbosity"]
    assert saturation.status == verbosity.status == WARNING
    assert "num_train_epochs=1" in saturation.suggestion and "Bradley–Terry loss" in saturation.evidence
    assert "balance the pairs' lengths" in verbosity.suggestion
    for result in (saturation, verbosity):
        assert not any(option in result.suggestion for option in DPO_ONLY_ADVICE), result.suggestion
        assert "beta" not in result.suggestion  # a reward model has no β
    # Checks about a policy's likelihoods or samples do not speak about a reward model.
    assert {results[name].status for name in ("likelihood", "dispersion", "over_optimisation", "eos")} == {NO_DATA}


def test_a_loss_with_a_finite_optimum_is_not_said_to_push_margins_on_nor_told_to_switch_to_one():
    records = healthy(**{"rewards/accuracies": lambda t: 0.99})
    ipo = verdicts(records, RunContext(beta=BETA, methods=("ipo",)))["saturation"]
    assert ipo.status == WARNING and "finite optimum" not in ipo.suggestion and "method=ipo" not in ipo.suggestion
    assert "pushes the margins further" not in ipo.evidence
    dpo = verdicts(records)["saturation"]  # a DPO run is told both
    assert "method=ipo" in dpo.suggestion and "the dpo loss only pushes the margins further" in dpo.evidence


def test_the_margin_is_said_to_grow_only_when_it_does():
    shrinking = verdicts(healthy(**{"rewards/accuracies": lambda t: 0.99,
                                    "rewards/margins": lambda t: 1.95 - 0.07 * (t - 0.05) / 0.95}))
    evidence = shrinking["saturation"].evidence
    assert "the margin did not grow, 1.95 → 1.88" in evidence and "kept growing" not in evidence
    growing = verdicts(healthy(**{"rewards/accuracies": lambda t: 0.99, "rewards/margins": lambda t: 10 * t}))
    assert "the margin kept growing, 0.50 → 10.00" in growing["saturation"].evidence


def test_tiny_gradient_norms_near_a_zero_loss_are_not_spikes():
    # At loss ~0 the norms are ~1e-4: 0.0015 is 7.5× a median of 0.0002, and still no spike (the median's floor).
    records = healthy(loss=lambda t: 1e-4, grad_norm=lambda t: 0.0015 if t == 0.6 else 0.0002)
    assert verdicts(records)["grad_spikes"].status == OK
    monitor = HealthMonitor(CTX)
    assert not [w for record in records for w in monitor.update(record) if w.name == "grad_spikes"]
    # Above the floor the same rule still warns: 0.06 against a median of 0.0002 is 5 × more than 0.01.
    spiked = verdicts(healthy(grad_norm=lambda t: 0.06 if t == 0.6 else 0.0002))["grad_spikes"]
    assert spiked.status == WARNING and spiked.step == 120
