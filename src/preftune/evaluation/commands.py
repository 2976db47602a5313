"""What ``preftune pairs`` and ``preftune eval`` do, as functions over paths (the CLI only parses)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from preftune.evaluation.judges import GoldSentimentJudge, Judge, RewardModelJudge
from preftune.evaluation.metrics import evaluate_policy, format_table, implicit_reward_accuracy
from preftune.evaluation.pairs import build_pairs, save_pairs
from preftune.modeling.loading import load_tokenizer


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` file (one per line) or JSON Lines rows with a ``prompt`` field."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for i, line in enumerate(lines):
        row = json.loads(line)
        if not isinstance(row.get("prompt"), str):
            found = type(row.get("prompt")).__name__
            raise ValueError(f"{path}, row {i}, field 'prompt': expected a string, got {found}")
        prompts.append(row["prompt"])
    return prompts


def make_judge(spec: str) -> Judge:
    """``gold`` (VADER sentiment in [0, 1]) or the path of a reward model trained with ``method: reward``."""
    if spec == "gold":
        return GoldSentimentJudge()
    from transformers import AutoModelForSequenceClassification

    return RewardModelJudge(AutoModelForSequenceClassification.from_pretrained(spec).eval(), load_tokenizer(spec))


def _load(path: str):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def pairs_command(model: str, prompts: str, out: str, judge: str = "gold", k: int = 4, mode: str = "all",
                  max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0) -> str:
    """Sample ``k`` completions per prompt, score them, write pairs as JSONL; returns the report line."""
    rows, report = build_pairs(_load(model), load_tokenizer(model), read_prompts(prompts), make_judge(judge), k=k,
                               mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    save_pairs(rows, out)
    return f"{report}\nwritten {len(rows)} pairs to {out}"


def eval_command(model: str, reference: str, prompts: str, judge: str = "gold", pairs: str | None = None,
                 beta: float = 0.1, max_new_tokens: int = 64, num_samples: int = 1, temperature: float = 1.0,
                 seed: int = 0, out: str | None = None) -> str:
    """Evaluate ``model`` against ``reference``: reward, KL, win rate, length, EOS rate (and implicit-reward
    accuracy on held-out ``pairs``); writes JSON to ``out`` and returns a readable table."""
    tokenizer = load_tokenizer(model)
    policy, ref = _load(model), _load(reference)
    sampling = dict(max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature, seed=seed)
    results = {"policy": evaluate_policy(policy, ref, tokenizer, read_prompts(prompts), make_judge(judge),
                                         **sampling)}
    if pairs:
        rows = [json.loads(line) for line in Path(pairs).read_text(encoding="utf-8").splitlines() if line.strip()]
        results["policy"]["implicit_reward_accuracy"] = implicit_reward_accuracy(policy, ref, tokenizer, rows, beta)
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return format_table(results)
