"""``preftune demo``: the whole alignment loop on the embedded world, in a few minutes on two CPU cores.

world → SFT (π_ref) → on-policy pairs sampled from π_ref and labelled by the gold reward → DPO →
evaluation (gold reward, KL(π‖π_ref), win rate, length) → table, plots and the DPO run's health report. A
miniature of the DPO paper's IMDb experiment (Rafailov et al. 2023, arXiv 2305.18290, §6.1).

While DPO trains, every ``monitor_every`` steps it is evaluated twice, so that the health report
(:mod:`preftune.evaluation.report`) can follow it: on held-out pairs (π_ref's samples of held-out prompts, labelled
by the gold reward; the loop's ``eval_`` records), and by sampling held-out prompts (:func:`sample_monitor`:
gold reward, KL to π_ref, length, EOS rate, and the same for π_ref's samples).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM

from preftune.config import build_config
from preftune.demo.world import review_corpus, review_prompts, world_model, world_tokenizer
from preftune.errors import RunDirError
from preftune.evaluation.metrics import evaluate_policy
from preftune.evaluation.report import plot_reward_distributions, plot_training_curves, write_report
from preftune.evaluation.table import format_table
from preftune.metric_names import (
    EOS_RATE,
    GOLD_REWARD,
    KL,
    KL_TO_REF,
    LENGTH,
    REF_EOS_RATE,
    REF_GOLD_REWARD,
    REF_LENGTH,
    REFERENCE_REWARD,
    REWARD,
)
from preftune.rollout.judges import GoldSentimentJudge, score_rollout
from preftune.rollout.pairs import build_pairs, pairs_from_rollout, save_pairs
from preftune.rollout.record import Rollout
from preftune.rollout.sampling import SamplingParams, generate
from preftune.training.loop import PreferenceTrainer

log = logging.getLogger("preftune")


@dataclass
class DemoSettings:
    """Sizes of the demo; ``quick()`` shrinks them for tests."""

    output_dir: str = "runs/demo"
    seed: int = 0
    reviews: int = 5000
    sft_steps: int = 400
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    pair_prompts: int = 1500
    samples_per_prompt: int = 4
    max_new_tokens: int = 24
    beta: float = 0.5  # β = 0.1 moved KL faster than reward on this world (0.84 reward at KL 4.6)
    dpo_steps: int = 200  # experiments/frontier: β = 0.5 passes 0.9 gold reward near KL 2.5 and levels off at ≈3
    dpo_batch_size: int = 64
    dpo_learning_rate: float = 3e-4
    eval_prompts: int = 256
    eval_samples: int = 2
    monitor_every: int = 20  # DPO is evaluated every this many steps (held-out pairs, samples) for its report
    monitor_prompts: int = 64  # held-out prompts sampled at each of those evaluations
    monitor_pairs: int = 256  # held-out pairs (π_ref's samples of held-out prompts) evaluated then
    overwrite: bool = False  # replace a finished demo in output_dir

    @classmethod
    def quick(cls, output_dir: str) -> DemoSettings:
        # DPO's gain on this small world is ≈ +0.15 gold reward (0.52 → 0.67–0.69 over three seeds, 256 samples
        # each); 30 steps at 3e-4 gained ≈ 0.04, too close to the noise of a 32-sample evaluation.
        return cls(output_dir=output_dir, reviews=800, sft_steps=60, pair_prompts=96, eval_prompts=32,
                   max_new_tokens=16, dpo_steps=60, dpo_batch_size=32, dpo_learning_rate=6e-4, eval_samples=4,
                   monitor_every=20, monitor_prompts=32, monitor_pairs=64)


def train_stage(settings: DemoSettings, name: str, callbacks=(), **config) -> Path:
    """One training run of the pipeline under ``output_dir/name``; returns its ``final/`` folder."""
    out = Path(settings.output_dir) / name
    common = dict(output_dir=str(out), overwrite_output_dir=True, seed=settings.seed, logging_steps=10,
                  max_length=128, max_prompt_length=32, lr_scheduler_type="cosine", warmup_ratio=0.05,
                  cache_dir=str(Path(settings.output_dir) / "cache"),
                  bf16=False)  # the demo's small model is faster in fp32 (autocast's casts cost more than they save)
    objects = {k: config.pop(k) for k in ("model", "tokenizer", "train_dataset", "eval_dataset", "judge")
               if k in config}
    return PreferenceTrainer(build_config(common | config), callbacks=callbacks, **objects).train().final_dir


@dataclass
class World:
    """What every stage after SFT shares: the tokenizer, π_ref, the pairs and the held-out prompts."""

    tokenizer: object
    sft_dir: Path
    sft: object
    pairs: list[dict]
    eval_prompts: list[str]
    pair_report: object
    train_prompts: list[str]  # the prompts the pairs were sampled for (online methods sample their own)
    heldout: Rollout  # π_ref's samples of the held-out prompts, scored by the gold reward
    heldout_pairs: list[dict]  # their pairs, as the training pairs (with score_chosen, score_rejected)


DEMO_MARKER = ".preftune-demo"
FINISHED = "demo.json"


def claim_demo_folder(settings: DemoSettings) -> Path:
    """The demo's output folder, marked as a demo's; refused when it holds anything else, or a finished demo
    (unless ``overwrite``). An unfinished demo (a crash, an interrupt) is simply run again.

    ``~`` is expanded here, once, and ``settings.output_dir`` becomes the expanded path: the folder checked is the
    folder every stage writes to (a literal ``./~`` checked while the stages wrote to the home folder)."""
    out = Path(settings.output_dir).expanduser()
    settings.output_dir = str(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out} is a file; give the demo a new or empty folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and DEMO_MARKER not in entries:
        shown = ", ".join(entries[:4]) + (", …" if len(entries) > 4 else "")
        raise RunDirError(f"{out} is not a demo folder (it holds {shown}); the demo writes sft/, dpo/ and more "
                          "there, so give it an empty or new --output-dir")
    if FINISHED in entries and not settings.overwrite:
        raise RunDirError(f"{out} holds a finished demo; pass --overwrite to run it again there, or choose another "
                          "--output-dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `preftune demo`: this folder may be rewritten by the next demo\n")
    (out / FINISHED).unlink(missing_ok=True)  # a rerun is unfinished until it ends
    return out


def build_world(settings: DemoSettings, lap=lambda name: None) -> World:
    """Corpus → tokenizer → SFT (π_ref) → on-policy pairs labelled by the gold reward."""
    claim_demo_folder(settings)
    corpus = review_corpus(settings.reviews, seed=settings.seed)
    tokenizer = world_tokenizer(corpus)
    prompts = review_prompts(corpus, tokenizer, settings.pair_prompts + settings.eval_prompts, seed=settings.seed + 1)
    train_prompts, eval_prompts = prompts[: settings.pair_prompts], prompts[settings.pair_prompts :]
    lap("world")

    sft_dir = train_stage(settings, "sft", method="sft", model=world_model(tokenizer, seed=settings.seed),
                          tokenizer=tokenizer, train_dataset=[{"text": review} for review in corpus],
                          max_steps=settings.sft_steps, per_device_train_batch_size=settings.sft_batch_size,
                          learning_rate=settings.sft_learning_rate)
    sft = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    lap("sft")

    sampling = SamplingParams(max_new_tokens=settings.max_new_tokens, n=settings.samples_per_prompt,
                              seed=settings.seed)
    pairs, pair_report = build_pairs(sft, tokenizer, train_prompts, GoldSentimentJudge(), sampling, mode="all")
    save_pairs(pairs, Path(settings.output_dir) / "pairs.jsonl")
    log.info("demo: %s", pair_report)
    pairs = _pair_columns(pairs)
    # Held-out pairs, built the same way from the held-out prompts with another seed: what the policy is evaluated
    # on while it trains (the unseen responses of the health report) and what `preftune experiment scorer` ranks.
    heldout_sampling = SamplingParams(max_new_tokens=settings.max_new_tokens, n=settings.samples_per_prompt,
                                      seed=settings.seed + 3)
    heldout = score_rollout(GoldSentimentJudge(), generate(sft, tokenizer, eval_prompts, heldout_sampling))
    heldout_pairs, _ = pairs_from_rollout(heldout, "all")
    lap("pairs")
    return World(tokenizer, sft_dir, sft, pairs, eval_prompts, pair_report, train_prompts, heldout,
                 heldout_pairs)


def sample_record(metrics: dict, reference_rollout: Rollout) -> dict[str, float]:
    """The record a sample evaluation logs (names the health checks read): the policy's gold reward, KL to π_ref,
    mean length and EOS rate (:func:`preftune.evaluation.metrics.evaluate_policy`), and π_ref's on the same
    prompts."""
    ended = reference_rollout.ended_with_eos
    return {GOLD_REWARD: metrics[REWARD], KL_TO_REF: metrics[KL], LENGTH: metrics[LENGTH], EOS_RATE: metrics[EOS_RATE],
            REF_GOLD_REWARD: metrics[REFERENCE_REWARD],
            REF_LENGTH: sum(reference_rollout.lengths) / len(reference_rollout), REF_EOS_RATE: sum(ended) / len(ended)}


def sample_monitor(world: World, settings: DemoSettings, judge=None):
    """A step callback for the loop: every ``monitor_every`` steps, sample ``monitor_prompts`` held-out prompts
    once each and return :func:`sample_record` (π_ref's samples drawn once, with the same seed)."""
    judge = judge or GoldSentimentJudge()
    prompts = world.eval_prompts[: settings.monitor_prompts]
    sampling = SamplingParams(max_new_tokens=settings.max_new_tokens, n=1, seed=settings.seed + 4)
    reference_rollout = generate(world.sft, world.tokenizer, prompts, sampling)

    def monitor(step: int, model) -> dict | None:
        if step % settings.monitor_every:
            return None
        metrics = evaluate_policy(model.eval(), world.sft, world.tokenizer, prompts, judge, sampling,
                                  reference_rollout=reference_rollout)
        return sample_record(metrics, reference_rollout)

    return monitor


def run_demo(settings: DemoSettings) -> dict:
    """Run the pipeline; returns the evaluation of SFT and DPO and writes everything under ``output_dir``."""
    started = last = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal last
        timings[name] = round(time.perf_counter() - last, 1)
        log.info("demo: %s done in %.1f s", name, timings[name])
        last = time.perf_counter()

    world = build_world(settings, lap)
    out = Path(settings.output_dir)  # as the folder's claim expanded it
    tokenizer, sft, eval_prompts, pair_report = world.tokenizer, world.sft, world.eval_prompts, world.pair_report
    judge = GoldSentimentJudge()
    dpo_dir = train_stage(settings, "dpo", method="dpo", beta=settings.beta,
                          model=AutoModelForCausalLM.from_pretrained(world.sft_dir), tokenizer=tokenizer,
                          train_dataset=world.pairs, max_steps=settings.dpo_steps,
                          per_device_train_batch_size=settings.dpo_batch_size, learning_rate=settings.dpo_learning_rate,
                          eval_dataset=_pair_columns(world.heldout_pairs[: settings.monitor_pairs]),
                          eval_steps=settings.monitor_every, per_device_eval_batch_size=64,
                          callbacks=[sample_monitor(world, settings, judge)])
    dpo = AutoModelForCausalLM.from_pretrained(dpo_dir).eval()
    lap("dpo")

    sampling = SamplingParams(max_new_tokens=settings.max_new_tokens, n=settings.eval_samples, seed=settings.seed + 2)
    results = {"SFT (π_ref)": evaluate_policy(sft, sft, tokenizer, eval_prompts, judge, sampling,
                                              return_per_sample=True)}
    results["DPO"] = evaluate_policy(dpo, sft, tokenizer, eval_prompts, judge, sampling, return_per_sample=True,
                                     reference_rollout=results["SFT (π_ref)"]["per_sample"]["rollout"])
    lap("evaluation")

    rewards = {name: r.pop("per_sample")["rewards"] for name, r in results.items()}
    plot_reward_distributions(rewards, out / "reward_distribution.png")
    plot_training_curves({"SFT": out / "sft" / "metrics.jsonl", "DPO": out / "dpo" / "metrics.jsonl"},
                         out / "training_curves.png")
    report = write_report(out / "dpo")
    timings["total"] = round(time.perf_counter() - started, 1)
    health = [{"check": r.name, "status": r.status, "evidence": r.evidence, "suggestion": r.suggestion, "step": r.step}
              for r in report.results]
    summary = {"settings": asdict(settings), "judge": judge.name, "evaluation": results, "pairs": str(pair_report),
               "health": health, "seconds": timings}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    table = format_table(results)
    warnings = [r for r in report.results if r.warning]
    notes = "\n".join(f"- {r}" for r in warnings) or "- every check ok"
    (out / "demo.md").write_text(f"{table}\n\nHealth of the DPO run (dpo/report.html):\n\n{notes}\n")
    print(table)
    print(f"\nhealth of the DPO run ({report.html}):\n{notes}")
    print(f"\nwritten to {out}: demo.json, demo.md, pairs.jsonl, training_curves.png, reward_distribution.png, "
          f"sft/, dpo/ (with report.html, report.md) — {timings['total']:.0f} s in all "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    return summary


def _pair_columns(rows: list[dict]) -> list[dict]:
    return [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]
