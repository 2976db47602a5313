"""What ``preftune pairs`` and ``preftune eval`` do, as functions over paths (the CLI only parses).

Prompt files: ``.txt`` holds one prompt per line (blank lines are skipped); ``.jsonl`` holds one JSON object
per line with a ``prompt`` that is a string (newlines allowed, as in Anthropic HH's ``\\n\\nHuman: …``) or a
conversation (a list of ``{"role", "content"}`` messages, rendered with the policy's chat template). A bad
file raises :class:`preftune.errors.DataError` naming the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path

from preftune.data.textfile import nonblank_lines
from preftune.errors import ConfigError, DataError, ModelError
from preftune.evaluation.metrics import evaluate_policy, format_table, implicit_reward_accuracy
from preftune.rollout.encoding import Prompt, check_prompts
from preftune.rollout.judges import load_judge
from preftune.rollout.pairs import build_pairs, save_pairs
from preftune.rollout.sampling import SamplingParams

PROMPT_SUFFIXES = (".txt", ".jsonl")


def _json_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` of each JSON Lines row; a broken line or a non-object is named by its number."""
    rows = []
    for n, line in nonblank_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); each line must "
                            "be one JSON object") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a ``.txt`` file (one per line) or JSON Lines rows with a ``prompt`` field (see the module
    docstring); all strings or all conversations."""
    path = Path(path)
    if path.suffix not in PROMPT_SUFFIXES:
        raise DataError(str(path), None, None, f"prompts must be a .txt file (one prompt per line) or a .jsonl "
                        f"file (one {{\"prompt\": …}} object per line), got a '{path.suffix}' file")
    if path.suffix == ".txt":
        prompts: list[Prompt] = [line for _, line in nonblank_lines(path)]
    else:
        rows = _json_rows(path)
        for i, (_, row) in enumerate(rows):
            if "prompt" not in row:
                raise DataError(str(path), i, "prompt", f"missing (keys {sorted(row)}); each row needs "
                                "a 'prompt': a string or a list of {role, content} messages")
        prompts = [row["prompt"] for _, row in rows]
    if not prompts:
        raise DataError(str(path), None, None, "the file holds no prompts")
    check_prompts(prompts, str(path))  # a bad prompt's DataError names its line
    return prompts


def read_pairs(path: str | Path) -> list[dict]:
    """Held-out preference rows (JSON Lines with ``prompt``, ``chosen``, ``rejected``, text or conversational)."""
    path = Path(path)
    rows = _json_rows(path)
    for i, (_, row) in enumerate(rows):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise DataError(str(path), i, missing[0], "missing; held-out pairs need prompt, chosen and rejected")
    if not rows:
        raise DataError(str(path), None, None, "the file holds no pairs")
    return [row for _, row in rows]


def _load_policy(path: str, role: str):
    from transformers import AutoModelForCausalLM

    from preftune.modeling.loading import check_model_path, load_tokenizer, refuse_pickled_weights

    check_model_path(f"--{role}", path)  # a missing folder, not transformers' "Repo id must use …"
    refuse_pickled_weights(path, role)
    try:
        return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{role} {path}: cannot load a causal LM and its tokenizer ({type(e).__name__}: {e}); "
                         "give a local folder with config.json, weights and tokenizer files") from e


def _check_output_file(path: str | None, flag: str, example: str) -> None:
    """Refuse an output file that cannot be written (a folder) before any work is done."""
    if path is not None and Path(path).expanduser().is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give the path of the file to write (e.g. "
                          f"{Path(path) / example})")


def pairs_command(model: str, prompts: str, out: str, judge: str, k: int = 4, mode: str = "all",
                  max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  seed: int = 0, batch_size: int = 64) -> str:
    """Sample ``k`` completions per prompt, score them with ``judge``, write pairs as JSONL (conversational
    rows for conversation prompts); returns the report line, which names the judge."""
    if k < 2:
        raise ConfigError(f"--k must be at least 2 to form pairs (k completions per prompt), got {k}")
    _check_output_file(out, "--out", "pairs.jsonl")  # before the minutes of sampling, not after
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, n=k,
                            seed=seed, batch_size=batch_size)
    rows_in = read_prompts(prompts)
    scorer = load_judge(judge)
    policy, tokenizer = _load_policy(model, "model")
    rows, report = build_pairs(policy, tokenizer, rows_in, scorer, params, mode=mode)
    save_pairs(rows, out)
    return f"{report}\nwritten {len(rows)} pairs to {out}"


def eval_command(model: str, reference: str, prompts: str, judge: str, pairs: str | None = None,
                 beta: float = 0.1, max_new_tokens: int = 64, num_samples: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 64,
                 out: str | None = None, samples_out: str | None = None) -> str:
    """Evaluate ``model`` against ``reference``: reward (by ``judge``), KL, win rate, length, EOS rate (and
    implicit-reward accuracy on held-out ``pairs``); writes JSON to ``out`` and returns a readable table.
    Both name the judge. ``samples_out`` gets the samples the win rate compared, one JSON line per pair of
    samples (:func:`save_eval_samples`), for a blind human evaluation (``preftune annotate serve --samples``)."""
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {num_samples}")
    for path, flag, example in ((out, "--out", "eval.json"), (samples_out, "--samples-out", "samples.jsonl")):
        _check_output_file(path, flag, example)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            n=num_samples, seed=seed, batch_size=batch_size)
    prompt_rows = read_prompts(prompts)
    held_out = read_pairs(pairs) if pairs else None
    scorer = load_judge(judge)
    policy, tokenizer = _load_policy(model, "model")
    ref, _ = _load_policy(reference, "reference")
    results = {"policy": evaluate_policy(policy, ref, tokenizer, prompt_rows, scorer, params,
                                         return_per_sample=samples_out is not None)}
    if samples_out is not None:
        save_eval_samples(results["policy"].pop("per_sample"), scorer.name, samples_out)
    if held_out is not None:
        results["policy"]["implicit_reward_accuracy"] = implicit_reward_accuracy(policy, ref, tokenizer, held_out,
                                                                                 beta)
    if out:
        Path(out).write_text(json.dumps({"judge": scorer.name, **results}, indent=2))
    return format_table(results)


def save_eval_samples(per_sample: dict, judge: str, path: str | Path) -> Path:
    """Write the policy's and the reference's samples side by side as JSON Lines, one row per comparison the win
    rate counts: ``{prompt, policy, reference, policy_score, reference_score, judge, sample}`` (``sample`` is
    the index among the prompt's samples; conversation prompts stay lists of messages)."""
    rollout, reference = per_sample["rollout"], per_sample["reference_rollout"]
    rows = [{"prompt": prompt, "policy": mine, "reference": theirs, "policy_score": float(s_mine),
             "reference_score": float(s_theirs), "judge": judge, "sample": k % rollout.group_size}
            for k, (prompt, mine, theirs, s_mine, s_theirs) in enumerate(zip(
                rollout.sample_prompts, rollout.completions, reference.completions, per_sample["rewards"],
                per_sample["reference_rewards"]))]
    return save_pairs(rows, path)
