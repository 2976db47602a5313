"""Does the implicit reward work? The DPO policy as a reward model on the demo world, against the explicit ones.

On held-out prompts, π_ref (the SFT model) samples ``samples_per_prompt`` responses each; the gold reward (VADER)
scores them and orders every pair of them, as the training pairs were built (:func:`preftune.demo.pipeline.
build_world`). Each scorer ranks those held-out responses:

* the DPO policy's implicit reward β·log π/π_ref, summed (``sum``, the DPO paper's r̂, arXiv 2305.18290 Eq. 5) and
  per token (``avg``), and its reference-free log-likelihood;
* the SFT model's log-likelihood (summed, per token, −‖·‖₂) — what the data looks like to π_ref, no preference;
* a Bradley–Terry reward model (``method: reward``: the SFT body with a score head) trained on the same pairs for
  the same number of steps as DPO.

Reported per scorer: pairwise accuracy on the held-out pairs (score(chosen) > score(rejected), a tie wrong;
RewardBench's rule), the same on a sample of the training pairs (in-distribution), Spearman's rank correlation of
score and gold reward over all held-out responses and within each prompt (averaged over prompts; only
differences between responses of one prompt are meaningful for an implicit reward), and the scoring speed.
Everything is scored by :func:`preftune.evaluation.scoring.score_data`, pairs in the prefix-shared layout.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from preftune.demo.pipeline import DemoSettings, build_world, train_stage
from preftune.evaluation.scoring import ScoreResult, score_data

log = logging.getLogger("preftune")


@dataclass
class ScorerSettings:
    world: DemoSettings = field(default_factory=lambda: DemoSettings(output_dir="experiments/scorer/work"))
    reward_learning_rate: float = 3e-4  # as DPO's: the same pairs, steps, batch and learning rate
    train_pairs_scored: int = 1000  # a sample of the training pairs, for in-distribution accuracy
    batch_size: int = 64
    output_dir: str = "experiments/scorer"

    @classmethod
    def quick(cls, output_dir: str) -> ScorerSettings:
        world = DemoSettings.quick(str(Path(output_dir) / "work"))
        world.reviews, world.sft_steps, world.pair_prompts, world.dpo_steps = 600, 30, 64, 20
        return cls(world=world, train_pairs_scored=200, output_dir=output_dir)


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as Spearman's ρ needs)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # positions start+1 … end, averaged
            start = end
    return ranks


def spearman(x, y) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (NaN when either side is constant)."""
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    scale = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / scale) if scale > 0 else float("nan")


# label → (model key, variants); models: "dpo" (with the SFT reference), "sft", "rm"
SCORERS = {
    "DPO implicit reward, Σ log π/π_ref": ("dpo", "sum"),
    "DPO implicit reward, per token": ("dpo", "avg"),
    "DPO log-likelihood, Σ log π": ("dpo", "ref_free_sum"),
    "SFT log-likelihood, Σ log π": ("sft", "ref_free_sum"),
    "SFT log-likelihood, per token": ("sft", "ref_free_avg"),
    "SFT −‖log π‖₂": ("sft", "ref_free_norm"),
    "Bradley–Terry reward model": ("rm", "reward"),
}


def run_scorer_experiment(settings: ScorerSettings) -> dict:
    """Train DPO and the reward model on the demo world's pairs, score the held-out responses and pairs with every
    scorer; write ``results.json`` and ``scorer.md`` under ``output_dir``; return the results."""
    started = time.perf_counter()
    world = build_world(settings.world)
    w = settings.world
    common = dict(tokenizer=world.tokenizer, train_dataset=world.pairs, max_steps=w.dpo_steps,
                  per_device_train_batch_size=w.dpo_batch_size)
    dpo_dir = train_stage(w, "runs/dpo", method="dpo", beta=w.beta, learning_rate=w.dpo_learning_rate,
                          model=AutoModelForCausalLM.from_pretrained(world.sft_dir), **common)
    rm_dir = train_stage(w, "runs/rm", method="reward", learning_rate=settings.reward_learning_rate,
                         model=AutoModelForCausalLM.from_pretrained(world.sft_dir), **common)
    trained = time.perf_counter()
    models = {"dpo": AutoModelForCausalLM.from_pretrained(dpo_dir).eval(), "sft": world.sft,
              "rm": AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()}

    heldout = world.heldout
    responses = [{"prompt": p, "completion": c} for p, c in zip(heldout.sample_prompts, heldout.completions)]
    kept = [i for i, row in enumerate(responses) if row["completion"].strip()]  # empty samples are not data
    gold = np.array([heldout.scores[i] for i in kept])
    group = np.array([i // heldout.group_size for i in kept])
    rng = np.random.default_rng(0)
    train_sample = [world.pairs[i] for i in sorted(rng.choice(len(world.pairs), min(settings.train_pairs_scored,
                                                                                     len(world.pairs)), replace=False))]
    cache = Path(w.output_dir) / "cache"

    def score(model_key: str, variants: list[str], data) -> ScoreResult:
        reference = world.sft if model_key == "dpo" else None
        return score_data(models[model_key], world.tokenizer, data, reference, beta=w.beta, variants=variants,
                          batch_size=settings.batch_size, cache_dir=cache)

    rows = {}
    for model_key in ("dpo", "sft", "rm"):
        variants = [v for k, v in SCORERS.values() if k == model_key]
        on_pairs = score(model_key, variants, world.heldout_pairs)
        on_train = score(model_key, variants, train_sample)
        on_responses = score(model_key, variants, [responses[i] for i in kept])
        for label, (key, variant) in SCORERS.items():
            if key != model_key:
                continue
            values = on_responses.scores[variant]
            within = [spearman(values[group == g], gold[group == g]) for g in np.unique(group)]
            within = [x for x in within if np.isfinite(x)]
            rows[label] = {"accuracy": on_pairs.accuracy()[variant], "train_accuracy": on_train.accuracy()[variant],
                           "spearman": spearman(values, gold), "spearman_within_prompt": float(np.mean(within)),
                           "pairs_per_second": on_pairs.rate}
        log.info("scorer: %s scored %d held-out pairs at %.0f pairs/s", model_key, on_pairs.n, on_pairs.rate)
    results = {"settings": asdict(settings), "heldout_prompts": heldout.num_prompts,
               "heldout_pairs": len(world.heldout_pairs), "heldout_responses": len(kept),
               "empty_responses_left_out": len(responses) - len(kept), "train_pairs_scored": len(train_sample),
               "prompts_with_spearman": int(len(np.unique(group))), "scorers": rows,
               "seconds": {"training": round(trained - started, 1),
                           "scoring": round(time.perf_counter() - trained, 1)}}
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "scorer.md").write_text(scorer_table(results) + "\n")
    return results


def scorer_table(results: dict) -> str:
    """Markdown: one row per scorer."""
    lines = [f"Held-out: {results['heldout_pairs']} pairs from {results['heldout_prompts']} prompts (gold-labelled "
             f"samples of π_ref), {results['heldout_responses']} responses; training pairs: a sample of "
             f"{results['train_pairs_scored']}.", "",
             "| scorer | held-out accuracy | training-pair accuracy | Spearman ρ (all responses) | "
             "Spearman ρ (within prompt) | pairs/s |", "|---|---:|---:|---:|---:|---:|"]
    for label, r in results["scorers"].items():
        lines.append(f"| {label} | {r['accuracy']:.3f} | {r['train_accuracy']:.3f} | {r['spearman']:+.3f} | "
                     f"{r['spearman_within_prompt']:+.3f} | {r['pairs_per_second']:.0f} |")
    return "\n".join(lines)
