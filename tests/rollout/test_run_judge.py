"""Facts about a run's judge, decided in one place (:func:`preftune.rollout.judges.resolve_judge`): a user's function
is wrapped, a spec is loaded, an object passed wins over the config, no judge is one message naming what needs it
and every way to give one, the embedded world alone defaults to the gold reward, and a pairwise judge is kept,
scores Online DPO's pairs, or is refused, as the run says."""

from __future__ import annotations

import logging
import textwrap

import pytest

from preftune.errors import ConfigError, ModelError
from preftune.rollout.judges import (
    CallableJudge,
    GoldSentimentJudge,
    PairPreferenceJudge,
    ScalarPairwiseJudge,
    check_judge,
    default_judge,
    judge_scores,
    resolve_judge,
)
from preftune.rollout.record import Rollout

ONLINE = "method grpo"


def length(prompts, completions):
    return [float(len(c)) for c in completions]


class LongerWins:
    """A pairwise judge: the longer completion wins surely, equal lengths tie."""

    name = "longer_wins"

    def __init__(self):
        self.calls = []

    def prefer(self, prompts, completions_a, completions_b):
        self.calls.append((list(prompts), list(completions_a), list(completions_b)))
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5
                for a, b in zip(completions_a, completions_b)]


def test_a_plain_function_is_wrapped_and_an_object_passed_wins_over_the_config():
    judge = resolve_judge(length, "gold", who=ONLINE)
    assert isinstance(judge, CallableJudge) and judge.name == "length"
    assert judge_scores(judge, ["p", "q"], ["ab", "abcd"]) == [2.0, 4.0]
    scalar = CallableJudge(length, name="mine")
    assert resolve_judge(scalar, "gold", who=ONLINE) is scalar


def test_a_spec_is_loaded(tmp_path, monkeypatch):
    assert isinstance(resolve_judge(None, "gold", who=ONLINE), GoldSentimentJudge)
    (tmp_path / "run_judge_functions.py").write_text(textwrap.dedent("""
        def exclaim(prompts, completions):
            return [float(c.count("!")) for c in completions]
    """))
    monkeypatch.chdir(tmp_path)
    judge = resolve_judge(None, "run_judge_functions:exclaim", who=ONLINE)
    assert judge.name == "run_judge_functions:exclaim" and judge.score(["p", "p"], ["a!", "b!!"]) == [1.0, 2.0]


@pytest.mark.parametrize("who", ["method grpo", "method ppo", "method rso"])
def test_no_judge_is_one_message_naming_who_needs_it_and_every_way_to_give_one(who):
    with pytest.raises(ConfigError) as caught:
        resolve_judge(None, None, who=who)
    message = str(caught.value)
    assert message.startswith(f"{who} needs a judge to score its samples")
    ways = ("reward-model folder", "reward_model_path", "'module:function'", "'gold'", "pass judge= to the trainer")
    for way in ways:
        assert way in message, way
    with pytest.raises(ConfigError, match=f"^{who} needs a judge"):
        check_judge(None, "", who=who)  # the cheap check a trainer runs before anything loads says the same


def test_what_is_no_judge_is_refused_by_what_it_is():
    with pytest.raises(ConfigError, match="judge='gold' passed to the trainer is a spec: set it as the config's"):
        resolve_judge("gold", None, who=ONLINE)
    with pytest.raises(ConfigError, match="got 3 of type int"):
        resolve_judge(3, None, who=ONLINE)


def test_only_the_embedded_world_defaults_to_the_gold_reward_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="preftune"):
        assert default_judge(None, None, embedded_world=True) == "gold"
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("no judge")] == [
        "no judge: the embedded default (tiny Llama, built-in preferences) is judged by its gold reward, judge=gold "
        "(VADER sentiment of prompt + completion); set judge to use another"]
    assert default_judge(None, None, embedded_world=False) is None  # data or a model of one's own: asked for
    assert default_judge(length, None, embedded_world=True) is None  # an object passed is the judge
    assert default_judge(None, "my:judge", embedded_world=True) == "my:judge"


def test_a_pairwise_judge_is_kept_scores_pairs_or_is_refused_as_the_run_says():
    pairwise = LongerWins()
    assert resolve_judge(pairwise, None, who="method sppo", pairwise="keep") is pairwise  # the rounds call prefer
    scored = resolve_judge(pairwise, None, who="method online_dpo", pairwise="pairs")
    assert isinstance(scored, PairPreferenceJudge) and scored.name == "longer_wins"
    with pytest.raises(ConfigError) as caught:
        resolve_judge(pairwise, None, who="method grpo")  # refused by default
    message = str(caught.value)
    assert "judge 'longer_wins' is pairwise" in message and "method grpo needs one score per completion" in message
    assert "online_dpo" in message  # where it can be used
    # A scalar judge seen as a pairwise one is still pairwise: refused where a score per completion is needed.
    with pytest.raises(ConfigError, match="is pairwise"):
        check_judge(ScalarPairwiseJudge(CallableJudge(length)), None, who="method ppo")


def test_a_pairwise_judge_scores_two_samples_of_a_prompt_with_their_probabilities_of_winning():
    pairwise = LongerWins()
    judge = PairPreferenceJudge(pairwise)
    # A rollout of n = 2 (Online DPO's): sample k of prompt i at 2i + k.
    rollout = Rollout(prompts=["p", "q", "r"], prompt_ids=[[1], [2], [3]], group_size=2,
                      completion_ids=[[5]] * 6, logprobs=[[0.0]] * 6, ended_with_eos=[True] * 6,
                      completions=["a", "bbb", "cc", "c", "dd", "ee"])
    scores = judge_scores(judge, rollout.sample_prompts, rollout.completions)
    assert scores == [0.0, 1.0, 1.0, 0.0, 0.5, 0.5]  # the preferred one scores higher, a tie stays a tie
    assert pairwise.calls == [(["p", "q", "r"], ["a", "cc", "dd"], ["bbb", "c", "ee"])]  # one call, each pair once

    soft = PairPreferenceJudge(ScalarPairwiseJudge(CallableJudge(length)))  # P(a ≻ b) = σ(len a − len b)
    p, q = soft.score(["x", "x"], ["aa", "a"])
    assert p == pytest.approx(1 / (1 + 2.718281828459045 ** -1)) and p + q == pytest.approx(1.0)


def test_a_pairwise_judge_refuses_completions_that_are_not_pairs_of_one_prompt():
    judge = PairPreferenceJudge(LongerWins())
    with pytest.raises(ConfigError, match="an odd number of completions.*needs a scalar judge"):
        judge.score(["p"], ["a"])  # one sample per held-out prompt: nothing to compare it with
    with pytest.raises(ConfigError, match="completions 2 and 3 answer different prompts"):
        judge.score(["p", "p", "q", "r"], ["a", "b", "c", "d"])

    class Broken:
        name = "broken"

        def prefer(self, prompts, a, b):
            return [1.5] * len(a)

    with pytest.raises(ModelError, match="judge 'broken' returned 1.5; P"):
        PairPreferenceJudge(Broken()).score(["p", "p"], ["a", "b"])
