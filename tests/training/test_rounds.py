"""RSO, SPPO and iterative DPO as rounds above the one loop: facts about their data, their loss, their resumes and
their effect on the demo world; best-of-n on the frontier."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from preftune import PreferenceTrainer
from preftune.config import build_config
from preftune.data import formats, tokenize
from preftune.data.batching import PreferenceCollator
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError, DataError, ResumeError
from preftune.methods import rl
from preftune.modeling.logprobs import completion_logps, model_inputs
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.rollout.judges import CallableJudge, ScalarPairwiseJudge
from preftune.rollout.record import Rollout
from preftune.training.rounds import judge_rollout, rso_pairs

ROWS = builtin_preferences(16, seed=7)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


def cheerful(prompts, completions):
    """A judge users could write: exclamation marks, the word 'Sure' and length are good."""
    return [float(c.count("!") + ("Sure" in c)) + 0.01 * len(c) for c in completions]


def rounds_trainer(tmp_path, tok, method, name="run", callbacks=(), **overrides):
    config = dict(method=method, output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), max_steps=2,
                  per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, disable_tqdm=True, seed=0,
                  max_completion_length=6, bf16=False, num_rounds=2, num_generations=2) | overrides
    return PreferenceTrainer(build_config(config), model=build_tiny_model(tok, seed=0), tokenizer=tok,
                             train_dataset=ROWS[:8], judge=cheerful, callbacks=list(callbacks))


# ---- the loss interface: SPPO's per-example targets flow from the rows to the loss ---------------------------


def test_sppo_win_probabilities_flow_from_the_rows_to_the_logged_loss(tmp_path, tok):
    rows = [dict(r, chosen_win_prob=p_w, rejected_win_prob=p_l)
            for r, p_w, p_l in zip(ROWS[:4], (0.9, 0.6, 0.55, 0.7), (0.1, 0.3, 0.5, 0.2))]
    beta = 0.5
    policy, reference = build_tiny_model(tok, seed=0), build_tiny_model(tok, seed=1)  # ρ ≠ 0 at the first step
    config = build_config(dict(method="sppo", beta=beta, output_dir=str(tmp_path / "one"), num_rounds=1,
                               cache_dir=str(tmp_path / "cache"), max_steps=1, per_device_train_batch_size=4,
                               learning_rate=1e-6, logging_steps=1, disable_tqdm=True, bf16=False))
    PreferenceTrainer(config, model=policy, ref_model=reference, tokenizer=tok, train_dataset=rows).train_once()
    logged = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])

    normalised, _ = formats.normalise(formats.datasets.Dataset.from_list(ROWS[:4]), "rows")
    ids, _ = tokenize.tokenize_rows(normalised, tok, max_length=1024, max_prompt_length=512,
                                    cache_dir=tmp_path / "hand")
    batch = PreferenceCollator(tok.pad_token_id, prefix_sharing=False)(list(ids))
    with torch.no_grad():
        s = completion_logps(build_tiny_model(tok, seed=0).eval(), **model_inputs(batch))["logps"]
        r = completion_logps(reference.eval(), **model_inputs(batch))["logps"]
    rho_w, rho_l = (s - r)[:4], (s - r)[4:]
    p_w, p_l = torch.tensor([0.9, 0.6, 0.55, 0.7]), torch.tensor([0.1, 0.3, 0.5, 0.2])
    eta = 1 / beta
    hand = 0.5 * ((rho_w - eta * (p_w - 0.5)) ** 2 + (rho_l - eta * (p_l - 0.5)) ** 2)  # Wu et al. 2024, Alg. 1
    assert logged["loss"] == pytest.approx(hand.mean().item(), rel=1e-4)


def test_a_row_without_the_columns_a_loss_reads_is_refused_by_name(tmp_path, tok):
    rows = [dict(r, chosen_win_prob=0.7, rejected_win_prob=0.3) for r in ROWS[:4]]
    rows[2]["rejected_win_prob"] = None
    config = build_config(dict(method="sppo", output_dir=str(tmp_path / "x"), cache_dir=str(tmp_path / "cache"),
                               max_steps=1, disable_tqdm=True, bf16=False))
    with pytest.raises(DataError, match=r"row 2 \(0-based\), field 'rejected_win_prob': must be a finite number"):
        PreferenceTrainer(config, model=build_tiny_model(tok), tokenizer=tok, train_dataset=rows).train_once()
    with pytest.raises(DataError, match="has no column 'chosen_win_prob', 'rejected_win_prob'"):
        PreferenceTrainer(config, model=build_tiny_model(tok), tokenizer=tok, train_dataset=ROWS[:4]).train_once()


# ---- judging and pairing ------------------------------------------------------------------------------------


def _rollout(scores: list[float], k: int) -> Rollout:
    n = len(scores)
    return Rollout(prompts=[f"p{i}" for i in range(n // k)], prompt_ids=[[1, i] for i in range(n // k)],
                   group_size=k, completion_ids=[[10 + j] for j in range(n)], logprobs=[[0.0]] * n,
                   ended_with_eos=[True] * n, completions=[f"c{j} " + "!" * int(s) for j, s in enumerate(scores)])


def test_a_pairwise_judge_gives_the_win_probabilities_of_its_scalar_judge():
    scores = [0.0, 3.0, 1.0, 2.0, 5.0, 4.0]
    judge = CallableJudge(lambda prompts, completions: [float(c.count("!")) for c in completions], name="bangs")
    scalar = judge_rollout(judge, _rollout(scores, 3))
    pairwise = judge_rollout(ScalarPairwiseJudge(judge), _rollout(scores, 3))
    expected = rl.sppo_win_probs(torch.tensor(scores, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert scalar == pytest.approx(expected.tolist(), abs=1e-12) and pairwise == pytest.approx(scalar, abs=1e-12)


@pytest.mark.parametrize("pairing,pairs_per_prompt", [("first_round", 2), ("tournament", 3)])
def test_rso_pairs_of_beta_zero_pair_the_best_candidates(pairing, pairs_per_prompt):
    scores = [3.0, 0.0, 7.0, 1.0, 5.0, 2.0, 6.0, 4.0]  # one prompt, 8 candidates
    rollout = _rollout(scores, 8)
    rollout.scores = scores
    rows, report, rate = rso_pairs(rollout, [s / 10 for s in scores], n=4, beta=0.0, pairing=pairing, seed=0)
    assert report.pairs == pairs_per_prompt and rate == pytest.approx(1 / 8)  # β → 0: the best alone passes
    used = {row["score_chosen"] for row in rows} | {row["score_rejected"] for row in rows}
    assert used == {4.0, 5.0, 6.0, 7.0}  # best-of-K: the top 4 by score
    assert all(row["score_chosen"] > row["score_rejected"] for row in rows)
    assert all(row["chosen_win_prob"] == row["score_chosen"] / 10 for row in rows)
    if pairing == "tournament":  # the final is played by the winners of the first stage
        assert max(row["score_chosen"] for row in rows) == 7.0 and rows[-1]["score_chosen"] == 7.0


# ---- the rounds run: records, resume, refusals -------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_a_run_of_rounds_resumes_in_its_interrupted_round_as_if_never_interrupted(tmp_path, tok):
    settings = dict(max_steps=3, save_steps=1, num_rounds=2)
    whole = rounds_trainer(tmp_path, tok, "iterative_dpo", name="whole", **settings).train()

    def crash(step, model):
        if step == 5:  # round 2's step 2: after its checkpoint-1
            raise Interrupt

    with pytest.raises(Interrupt):
        rounds_trainer(tmp_path, tok, "iterative_dpo", callbacks=[crash], **settings).train()
    run = tmp_path / "run"
    assert (run / "round-1" / "round.json").exists() and not (run / "round-2" / "round.json").exists()
    kept = {p: p.stat().st_mtime_ns for p in [run / "round-1" / "pairs.jsonl", run / "round-1" / "final" /
                                              "model.safetensors", run / "round-2" / "pairs.jsonl"]}
    with pytest.raises(ResumeError, match="beta: 0.1 → 0.3"):
        rounds_trainer(tmp_path, tok, "iterative_dpo", resume_from_checkpoint=True, beta=0.3, **settings).train()
    resumed = rounds_trainer(tmp_path, tok, "iterative_dpo", resume_from_checkpoint=True, **settings).train()

    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # round 1 and round 2's data were not redone
    steps = [json.loads(line)["step"] for line in (run / "round-2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    a = load_file(whole.final_dir / "model.safetensors")
    b = load_file(resumed.final_dir / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    record = json.loads((run / "rounds.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [1, 2] and resumed.global_step == 6
    assert (run / "final").resolve() == (run / "round-2" / "final").resolve()


def test_rounds_record_their_data_model_and_reference(tmp_path, tok):
    result = rounds_trainer(tmp_path, tok, "sppo", eval_split_size=0.25, num_generations=3).train()
    record = json.loads((result.output_dir / "rounds.json").read_text())
    first, second = record["rounds"]
    assert first["sampled_from"] == "the initial model" and second["sampled_from"] == "round 1"
    pairs = [json.loads(line) for line in (result.output_dir / "round-2" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == first["prompts"] == 6 and all(p["chosen_win_prob"] > p["rejected_win_prob"] for p in pairs)
    # SPPO's reference is the previous iterate: at round 2's first step π = π_1, so the loss is ½η²Σ(P̂ − ½)².
    eta = 1 / 1e-3
    targets = [0.5 * eta**2 * ((p["chosen_win_prob"] - 0.5) ** 2 + (p["rejected_win_prob"] - 0.5) ** 2)
               for p in pairs]
    first_batch = json.loads((result.output_dir / "round-2" / "metrics.jsonl").read_text().splitlines()[0])
    assert min(targets) <= first_batch["loss"] <= max(targets)
    assert set(record["initial_eval"]) == set(first["eval"]) >= {"reward", "kl", "win_rate", "length"}
    assert record["initial_eval"]["kl"] == 0.0 and record["initial_eval"]["win_rate"] == 0.5


def test_rounds_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="rso_samples .* must be >= 2 and at most the 64"):
        build_config({"method": "rso", "rso_samples": 65})
    with pytest.raises(ConfigError, match="num_rounds: only for methods trained in rounds"):
        build_config({"method": "dpo", "num_rounds": 3})
    with pytest.raises(ConfigError, match="rso_beta: RSO's keys"):
        build_config({"method": "sppo", "rso_beta": 1.0})
    with pytest.raises(ConfigError, match="train alone"):
        build_config({"method": ["sppo", "sft"]})
    with pytest.raises(ConfigError, match="always the previous iterate"):
        build_config({"method": "sppo", "refresh_reference": True})
    with pytest.raises(ConfigError, match="set resume_from_checkpoint=true"):
        build_config({"method": "iterative_dpo", "resume_from_checkpoint": "runs/x/round-2"})
    with pytest.raises(ConfigError, match="^method sppo needs a judge to score its samples, and none is given"):
        # data of one's own (the embedded default alone is judged by its gold reward)
        PreferenceTrainer(build_config({"method": "sppo", "output_dir": str(tmp_path / "x")}),
                          train_dataset=ROWS[:8]).train()
    assert not (tmp_path / "x").exists()  # refused before anything loads


def test_iterative_dpo_refreshes_its_reference_only_when_asked(tmp_path, tok):
    class Recorder:
        def __init__(self):
            self.steps, self.logged, self.ends = [], [], 0

        def on_step_end(self, step, model):
            self.steps.append(step)

        def on_log(self, record):
            self.logged.append((record.get("round"), record.get("step")))

        def on_train_end(self, result):
            self.ends += 1

    first_losses = {}
    for refresh in (False, True):
        recorder = Recorder()
        result = rounds_trainer(tmp_path, tok, "iterative_dpo", name=f"refresh-{refresh}", callbacks=[recorder],
                                refresh_reference=refresh).train()
        record = json.loads((result.output_dir / "rounds.json").read_text())
        first_losses[refresh] = [r["training"]["first_loss"] for r in record["rounds"]]
        assert recorder.steps == [1, 2, 3, 4] and recorder.ends == 1  # steps over the whole run; one end
        assert (2, 3) in recorder.logged and (1, 1) in recorder.logged
    # Round 1 starts at π = π_0 = π_ref either way: DPO's loss is ln 2. In round 2, π_1 against a refreshed
    # reference π_1 gives ln 2 again; against the fixed π_0 it does not.
    assert first_losses[False][0] == pytest.approx(math.log(2), abs=1e-5)
    assert first_losses[True] == pytest.approx([math.log(2)] * 2, abs=1e-5)
    assert abs(first_losses[False][1] - math.log(2)) > 1e-3


def test_a_run_of_rounds_has_no_single_session_to_evaluate(tmp_path, tok):
    with pytest.raises(ConfigError, match="trains in rounds.*rounds.json"):
        rounds_trainer(tmp_path, tok, "sppo").evaluate()


def test_a_trained_run_of_rounds_points_at_its_models_instead_of_handing_back_the_initial_one(tmp_path, tok):
    trainer = rounds_trainer(tmp_path, tok, "iterative_dpo")
    result = trainer.train()
    assert (result.final_dir / "model.safetensors").exists()
    with pytest.raises(ConfigError, match=r"trainer.model works on one run.*round-k/final, the last one in "):
        _ = trainer.model


# ---- best-of-n on the frontier ----------------------------------------------------------------------------


def test_best_of_n_sits_at_its_analytic_kl_with_the_best_of_its_first_n_samples(tok):
    from preftune.demo.pipeline import DemoSettings, World
    from preftune.experiments.frontier import FrontierSettings, best_of_n
    from preftune.rollout.judges import GoldSentimentJudge, score_rollout
    from preftune.rollout.sampling import SamplingParams, generate

    prompts = ["The movie was", "I thought the plot", "The acting was", "Honestly, the film"]
    sft = build_tiny_model(tok, seed=0).eval()
    world = World(tok, None, sft, [], prompts, None, [], None, [])
    settings = FrontierSettings(world=DemoSettings(max_new_tokens=5, seed=3), eval_prompts=4)
    points, tokens = best_of_n(world, settings, sizes=(1, 2, 4))
    assert [p["kl"] for p in points] == [0.0, math.log(2) - 1 / 2, math.log(4) - 3 / 4]
    rollout = score_rollout(GoldSentimentJudge(), generate(sft, tok, prompts, SamplingParams(
        max_new_tokens=5, n=4, seed=settings.world.seed + 3, batch_size=256)))
    scores = rollout.grouped(rollout.scores)
    for point in points:
        assert point["reward"] == pytest.approx(scores[:, : point["n"]].max(dim=1).values.mean().item())
    assert points[0]["reward"] <= points[1]["reward"] <= points[2]["reward"] and tokens == sum(rollout.lengths)
