"""Rounds above the run driver: RSO, SPPO and iterative DPO as runs of sample → judge → pairs → train.

A method whose registry entry has ``rounds`` (:class:`preftune.methods.registry.Rounds`) trains in
``num_rounds`` rounds; for round k = 1 … N:

1. **sample** ``num_generations`` completions of each of the round's prompts (all prompts, or the k-th
   ``prompts_per_round`` of them) from the current iterate π_{k−1} (SPPO, iterative DPO) or from the model the
   run started with, π_0 (RSO's proposal π_sft), seeded by (seed, k);
2. **judge** them: a scalar judge's scores (minus ``missing_eos_penalty`` for completions that never ended), and
   each completion's estimated win probability against the prompt's K samples,
   P̂(y_i ≻ π) = mean_j P(y_i ≻ y_j) with P = σ(s_i − s_j) (j = i included, ½; SPPO, Wu et al. 2024, arXiv
   2405.00675, Alg. 1). A pairwise judge (``prefer(prompts, a, b)``) gives P directly, and P̂ serves as the score;
3. **pair** them as the method says:
   * ``rso`` (Liu et al. 2023, arXiv 2309.06657, Alg. 1 and §3.2): statistical rejection sampling of
     ``rso_samples`` of the candidates towards π_0·exp(r/β), β = ``rso_beta``
     (:func:`preftune.methods.rl.rso_sample`), then ``rso_pairing``: first-round (n/2 disjoint pairs) or
     tournament (n − 1 matches), each labelled by the judge. The expected acceptance rate of the first pass,
     mean_i exp((r_i − r_max)/β) (their Thm. 1), is logged per round;
   * ``best_vs_worst`` (SPPO; iterative DPO, Dong et al. 2024, arXiv 2405.07863): the highest- against the
     lowest-scored completion;

   every pair row carries both scores and both win probabilities (``chosen_win_prob``, ``rejected_win_prob``:
   SPPO's regression targets, read by the loss through the registry's ``extras``), and is written to
   ``round-k/pairs.jsonl`` in the prompts' format (with ``accumulate_pairs`` a round trains on every round's
   pairs so far);
4. **train** one run of the loop on the pairs in ``round-k/``, warm-started from π_{k−1}, against the method's
   reference: π_0 fixed (RSO, iterative DPO; ``refresh_reference``: π_{k−1}) or π_{k−1} (SPPO's π_t), and
   ``max_steps`` / ``num_train_epochs`` per round. Under LoRA each round adds fresh adapters to the previous
   round's merged model;
5. **evaluate** π_k on the held-out prompts (``eval_dataset``, or ``eval_split_size`` of the prompts, held out as
   every method holds rows out: :func:`preftune.training.setup.hold_out`, a prompt going where its first row goes),
   when there are any: one sample per prompt, its mean judge score, the win rate against π_0's sample of the same
   prompt, the sequence KL(π_k‖π_0) of those samples (:func:`preftune.rollout.kl.sequence_kl`: the exact per-token
   KL summed over each completion, as ``preftune eval``'s ``kl``), length and EOS rate.

The run folder: ``config.yaml``; ``rounds.json`` (the run's fingerprint, π_0's evaluation and each finished
round's record); per round ``round-k/`` with ``pairs.jsonl``, the loop's own files (``metrics.jsonl``,
``summary.json``, ``checkpoint-N/``, ``final/``) and ``round.json``, written last (the round is finished); at the
end ``summary.json`` and ``final`` (a link to the last round's model).

Resume (``resume_from_checkpoint=true``): finished rounds are kept as they are; the first unfinished one reuses its
``pairs.jsonl`` when it was written, resumes its training from its latest checkpoint (the loop checks that it
belongs to the same run) or trains it again; a run whose config or prompts changed is refused, naming what
changed (the fingerprint rules of :mod:`preftune.training.checkpoint`).

Several processes: the main process samples, judges and writes each round's pairs; every process trains.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from torch import nn

from preftune.config import TrainConfig
from preftune.data import formats, tokenize
from preftune.errors import ConfigError, DataError, ResumeError, RunDirError
from preftune.methods import rl
from preftune.methods.registry import Rounds
from preftune.modeling import loading
from preftune.modeling.logprobs import max_positions
from preftune.rollout.judges import (
    PairwiseJudge,
    judge_scores,
    resolve_judge,
    win_rate,
)
from preftune.rollout.kl import sequence_kl
from preftune.rollout.pairs import PairReport, pairs_from_rollout, save_pairs
from preftune.rollout.record import Rollout
from preftune.rollout.sampling import SamplingParams, generate, sampling_precision
from preftune.training import checkpoint, hub
from preftune.training.rundir import RunLock, RunResult, effective_config, open_run_folder, record_entries
from preftune.training.setup import (
    _load_model,
    _load_tokenizer,
    cache_root,
    data_sources,
    hold_out,
    judge_role,
    settle_judge,
)

log = logging.getLogger("preftune")

STATE_FILE = "rounds.json"
ROUND_RECORD = "round.json"
PAIRS_FILE = "pairs.jsonl"


def round_dir(out: Path, k: int) -> Path:
    return out / f"round-{k}"


# ------------------------------------------------------------------------------------ prompts


def _unique_prompts(rows: datasets.Dataset) -> list[Any]:
    """Each distinct prompt once, in first-seen order (a preference file repeats a prompt per pair)."""
    seen: dict[str, Any] = {}
    for prompt in rows["prompt"]:
        seen.setdefault(_prompt_key(prompt), prompt)
    return list(seen.values())


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True)


def _first_rows(rows: datasets.Dataset) -> dict[str, int]:
    """Each distinct prompt's first source row (its position when the rows carry none)."""
    numbers = rows[formats.SOURCE_ROW] if formats.SOURCE_ROW in rows.column_names else range(len(rows))
    first: dict[str, int] = {}
    for prompt, row in zip(rows["prompt"], numbers):
        first.setdefault(_prompt_key(prompt), row)
    return first


def check_prompts_fit(model: nn.Module, prompts: Sequence[dict]) -> None:
    """Refuse, before round 1 samples, a prompt that leaves the model no position for a completion, naming the
    prompt's file and row (the sampler would name only its place in a round)."""
    positions = max_positions(model)
    if positions is None:
        return
    for prompt in prompts:
        if len(prompt["prompt_ids"]) >= positions:
            raise DataError(prompt["source"], prompt["row"], "prompt", f"has {len(prompt['prompt_ids'])} tokens but "
                            f"the model reads at most {positions} positions, which leaves no room for a completion; "
                            f"set max_prompt_length below {positions} (long prompts keep their end), shorten the "
                            "prompt, or use a model with more positions")


def load_prompts(cfg: TrainConfig, tokenizer, train_dataset=None, eval_dataset=None
                 ) -> tuple[list[dict], list[dict], dict[str, str]]:
    """The run's prompts and held-out prompts as rows ``{prompt, prompt_ids}`` (ids encoded and truncated as
    training encodes them), and the fingerprints of both. Any dataset format gives its prompts (a preference
    file gives each distinct prompt once; the repeats are counted in the log)."""

    def read(rows, source: str) -> tuple[list[dict], str]:
        normalised, report = formats.normalise(rows, source, skip_invalid=cfg.skip_invalid_rows)
        log.info("rounds: %s", report)
        prompts = _unique_prompts(formats.to_prompts(normalised))
        if len(prompts) < len(normalised):
            log.info("rounds: %s holds %d distinct prompts in %d rows; each is sampled once per round", source,
                     len(prompts), len(normalised))
        data = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
        # Each prompt's first row in the file, for messages that name it (keyed as the tokenized rows give it back).
        first = _first_rows(normalised)
        file_rows = {_prompt_key(read_back): first[_prompt_key(p)] for p, read_back in zip(prompts, data["prompt"])}
        tokenized, tok_report = tokenize.tokenize_rows(
            data, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
            cache_dir=cache_root(cfg) / "tokenized", source=source)
        log.info("rounds: %s", tok_report)
        if len(tokenized) == 0:
            raise DataError(source, None, None, f"no prompt is left to sample for: {tok_report}")
        return [{"prompt": p, "prompt_ids": ids, "source": source, "row": file_rows.get(_prompt_key(p))}
                for p, ids in zip(tokenized["prompt"], tokenized["prompt_ids"])], tokenized._fingerprint

    (rows, source), given_eval = data_sources(cfg, train_dataset, eval_dataset)  # the rows every method reads
    prompts, fingerprint = read(rows, source)
    fingerprints = {"prompts": fingerprint}
    held_out: list[dict] = []
    if given_eval is not None:
        held_out, fingerprints["eval_prompts"] = read(*given_eval)
    elif cfg.eval_split_size > 0:  # the rows every method holds out: a prompt goes where its first row goes
        rows = ([r["row"] for r in prompts] if all(r["row"] is not None for r in prompts)
                else range(len(prompts)))
        held = hold_out(rows, cfg.eval_split_size, cfg.seed, source, unit="distinct prompts")
        held_out = [r for r, h in zip(prompts, held) if h]
        prompts = [r for r, h in zip(prompts, held) if not h]
    return prompts, held_out, fingerprints


def round_prompts(prompts: Sequence[dict], k: int, per_round: int | None) -> list[dict]:
    """Round k's prompts: all of them, or the k-th block of ``per_round`` (wrapping around the list)."""
    if per_round is None or per_round >= len(prompts):
        return list(prompts)
    start = (k - 1) * per_round
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]


# ------------------------------------------------------------------------------------ judging and pairing


def judge_rollout(judge, rollout: Rollout, missing_eos_penalty: float | None = None) -> list[float]:
    """Score ``rollout`` in place and return each sample's win probability P̂(y_i ≻ π) over its group.

    A scalar judge: ``scores`` are its scores (minus the missing-EOS penalty) and P̂_i = mean_j σ(s_i − s_j)
    (:func:`preftune.methods.rl.sppo_win_probs`). A pairwise judge: P_ij = ``judge.prefer`` for every pair
    i < j of a group (P_ji = 1 − P_ij, P_ii = ½), P̂_i = mean_j P_ij, and the scores are P̂."""
    group = torch.arange(len(rollout)) // rollout.group_size
    if isinstance(judge, PairwiseJudge) and not hasattr(judge, "score"):
        matches = [(g.start + a, g.start + b) for g in rollout.groups() for a in range(len(g))
                   for b in range(a + 1, len(g))]
        prompts = [rollout.prompts[rollout.prompt_index(i)] for i, _ in matches]
        prefer = judge.prefer(prompts, [rollout.completions[i] for i, _ in matches],
                              [rollout.completions[j] for _, j in matches])
        wins = torch.full((len(rollout),), 0.5, dtype=torch.float64)
        for (i, j), p in zip(matches, prefer):
            wins[i] += float(p)
            wins[j] += 1.0 - float(p)
        probs = wins / rollout.group_size
        rollout.scores, rollout.judge = probs.tolist(), judge.name
        return probs.tolist()
    scores = torch.tensor(judge_scores(judge, rollout.sample_prompts, rollout.completions), dtype=torch.float64)
    if missing_eos_penalty:
        scores = rl.missing_eos_penalty(scores, torch.tensor(rollout.ended_with_eos), missing_eos_penalty)
    rollout.scores, rollout.judge = scores.tolist(), judge.name
    return rl.sppo_win_probs(scores, group).tolist()


def _subset(rollout: Rollout, keep: list[list[int]]) -> Rollout:
    """The same prompts with only the samples ``keep[i]`` (flat indices, in that order) of prompt i."""
    flat = [k for group in keep for k in group]
    return Rollout(prompts=rollout.prompts, prompt_ids=rollout.prompt_ids, group_size=len(keep[0]),
                   completion_ids=[rollout.completion_ids[k] for k in flat],
                   logprobs=[rollout.logprobs[k] for k in flat],
                   ended_with_eos=[rollout.ended_with_eos[k] for k in flat],
                   completions=[rollout.completions[k] for k in flat],
                   scores=[rollout.scores[k] for k in flat], judge=rollout.judge)


def rso_pairs(rollout: Rollout, win_probs: Sequence[float], n: int, beta: float, pairing: str, seed: int
              ) -> tuple[list[dict], PairReport, float]:
    """RSO's pairs from a judged rollout of K candidates per prompt (Liu et al. 2023, arXiv 2309.06657):
    :func:`~preftune.methods.rl.rso_sample` draws n of each prompt's candidates (the scores as rewards), which
    are paired in acceptance order (``first_round`` or ``tournament``) and labelled by the scores.

    Returns the rows, the pair report and the expected acceptance rate of the first pass averaged over prompts,
    mean_i exp((r_i − r_max)/β) (their Thm. 1; at β = 0 it is 1/K, the best alone)."""
    generator = torch.Generator().manual_seed(seed)
    keep, rates = [], []
    for group in rollout.groups():
        rewards = torch.tensor([rollout.scores[k] for k in group], dtype=torch.float64)
        accepted = rl.rso_sample(rewards, n, beta, generator)
        keep.append([group.start + int(i) for i in accepted])
        gap = rewards - rewards.max()
        rates.append(float(torch.exp(gap / beta).mean()) if beta > 0 else float((gap == 0).double().mean()))
    chosen = _subset(rollout, keep)
    rows, report = pairs_from_rollout(chosen, pairing, {"win_prob": [win_probs[k] for group in keep for k in group]})
    return rows, report, sum(rates) / len(rates)


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_round(policy: nn.Module, initial: nn.Module, tokenizer, prompts: Sequence[dict], judge,
                   params: SamplingParams, initial_rollout: Rollout | None = None) -> dict[str, float]:
    """One sample of each held-out prompt from ``policy``: mean judge score (P̂ against π_0's sample for a
    pairwise judge), win rate against ``initial_rollout`` (π_0's samples, same seed), the sequence KL(π‖π_0) of the
    samples (:func:`preftune.rollout.kl.sequence_kl`, as every report's ``kl``), length and EOS rate."""
    texts, ids = [r["prompt"] for r in prompts], [r["prompt_ids"] for r in prompts]
    rollout = generate(policy, tokenizer, texts, params, prompt_ids=ids, source="the held-out prompts")
    record: dict[str, float] = {}
    if hasattr(judge, "score"):
        record["reward"] = sum(judge_scores(judge, texts, rollout.completions)) / len(rollout)
    if initial_rollout is not None:
        record["win_rate"] = win_rate(judge, texts, rollout.completions, initial_rollout.completions)
    record["kl"] = float(sequence_kl(policy, initial, rollout).mean())  # as `preftune eval` and the frontier
    record["length"] = sum(rollout.lengths) / len(rollout)
    record["eos_rate"] = sum(rollout.ended_with_eos) / len(rollout)
    return record


# ------------------------------------------------------------------------------------ the run


@dataclass
class RoundsRun:
    """What every round of a run shares."""

    cfg: TrainConfig
    spec: Rounds
    out: Path
    tokenizer: Any
    initial: nn.Module  # π_0, never trained in place
    reference: nn.Module | None  # the fixed reference (None: the previous iterate)
    judge: Any
    prompts: list[dict]
    held_out: list[dict]
    device: torch.device
    callbacks: list = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"generation": 0.0, "judging": 0.0})
    generated_tokens: int = 0

    def sampling(self, n: int, seed: int) -> SamplingParams:
        return SamplingParams.from_config(self.cfg, n=n, seed=seed)

    def autocast(self):
        if self.cfg.bf16 or self.cfg.fp16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.cfg.bf16 else torch.float16)
        return contextlib.nullcontext()

    def model_of(self, k: int) -> Path:
        """The folder of round k's model (merged under LoRA: the next round's adapters start from it)."""
        return round_dir(self.out, k) / ("final-merged" if self.cfg.use_peft else "final")


def _open_folder(cfg: TrainConfig, state: PartialState, fingerprint: dict) -> tuple[Path, RunLock | None]:
    """Check and lock the run folder (:func:`~preftune.training.rundir.open_run_folder`); a resume refuses a
    folder whose run of rounds had another config or other prompts."""

    def resume_from(out: Path) -> Path | None:
        if not cfg.resume_from_checkpoint:
            return None
        saved = out / STATE_FILE
        if not saved.exists():
            raise ResumeError(f"resume_from_checkpoint=true but {out} holds no run of rounds (no {STATE_FILE}); "
                              "start without resume_from_checkpoint")
        changes = checkpoint.fingerprint_changes(json.loads(saved.read_text())["run"], fingerprint)
        if changes:
            raise ResumeError(f"{out} holds another run of rounds; changed since: {'; '.join(changes)}. Resume with "
                              "the original settings (the run folder's config.yaml) or start a new run in another "
                              "output_dir")
        return saved

    out, _, lock = open_run_folder(cfg, state, resume_from)
    return out, lock


def _write_json(path: Path, value: dict) -> None:
    """Written whole or not at all: a crash never leaves half a record that reads as finished."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def _read_pairs(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_rounds(trainer) -> Any:
    """Run the rounds of ``trainer``'s config (a :class:`preftune.training.loop.PreferenceTrainer` whose method
    has ``rounds``); returns the last round's :class:`~preftune.training.rundir.RunResult`, with the run's folder,
    the last model, the total number of steps and the last round's metrics."""

    given = trainer.given
    # The judge settled before anything loads, as in every run that samples; the config as the run computes with it.
    trainer.resolved = replace(trainer.resolved, judge=settle_judge(trainer.cfg, trainer.judge, given["model"],
                                                                    given["train_dataset"]))
    cfg = trainer.resolved.applied(trainer.cfg)
    state = PartialState()
    started = time.perf_counter()
    tokenizer = _load_tokenizer(cfg, given["tokenizer"], _builtin_rows_if_needed(cfg, given))
    prompts, held_out, fingerprints = load_prompts(cfg, tokenizer, given["train_dataset"], given["eval_dataset"])
    fingerprint = checkpoint.run_fingerprint(effective_config(cfg), fingerprints)
    out, lock = _open_folder(cfg, state, fingerprint)
    try:
        run = _prepare(trainer, cfg, tokenizer, prompts, held_out, out, state)
        saved = json.loads((out / STATE_FILE).read_text()) if cfg.resume_from_checkpoint else None
        if state.is_main_process and saved is None:
            cfg.save(out / "config.yaml")
        record = {"run": fingerprint, "method": cfg.methods[0], "num_rounds": cfg.resolved_num_rounds,
                  "prompts": len(prompts), "held_out_prompts": len(held_out), "rounds": []}
        initial_rollout = _evaluate_initial(run, record, saved) if held_out and state.is_main_process else None
        if state.is_main_process:
            _write_json(out / STATE_FILE, record)

        result, offset = None, 0
        for k in range(1, cfg.resolved_num_rounds + 1):
            rdir = round_dir(out, k)
            finished = rdir / ROUND_RECORD
            if finished.exists():  # a resumed run keeps its finished rounds as they are
                done = json.loads(finished.read_text())
                log.info("rounds: round %d is finished (%s); kept", k, finished)
            else:
                done = _run_round(run, k, offset, initial_rollout, type(trainer))  # each round: a run of the driver
            record["rounds"].append(done)
            offset += done["training"]["global_step"]
            if state.is_main_process:
                _write_json(out / STATE_FILE, record)
            result = RunResult(out, run.model_of(k), offset, done["training"].get("train", {}),
                               {f"eval_{name}": v for name, v in (done.get("eval") or {}).items()},
                               record["rounds"][0]["training"].get("first_loss"))
        result.final_dir = _link_final(out, run.model_of(cfg.resolved_num_rounds), state)
        if state.is_main_process:
            _write_summary(run, record, result, time.perf_counter() - started)
            if cfg.push_to_hub:  # the last round's model, once
                hub.push_final(cfg, result.final_dir)
        for callback in trainer.callbacks:  # once for the whole run, not once per round
            if hasattr(callback, "on_train_end"):
                callback.on_train_end(result)
        return result
    finally:
        if lock is not None:
            lock.release()


def _evaluate_initial(run: RoundsRun, record: dict, saved: dict | None) -> Rollout:
    """π_0's sample of each held-out prompt (the baseline of every round's win rate) and, unless a resumed run
    recorded it, π_0's evaluation into ``record`` (main process)."""
    params = run.sampling(1, run.cfg.seed + 2)
    prompts = run.held_out
    with run.autocast():
        rollout = generate(run.initial, run.tokenizer, [r["prompt"] for r in prompts], params,
                           prompt_ids=[r["prompt_ids"] for r in prompts])
    record["initial_eval"] = (saved or {}).get("initial_eval") or evaluate_round(
        run.initial, run.initial, run.tokenizer, prompts, run.judge, params, rollout)
    log.info("rounds: π_0 on %d held-out prompts: %s", len(prompts), _shown(record["initial_eval"]))
    return rollout


def _write_summary(run: RoundsRun, record: dict, result, seconds: float) -> None:
    """``summary.json``: the run's record (without its fingerprint), where its model is, and where the time went."""
    summary = {**record, "final_dir": str(result.final_dir), "global_step": result.global_step,
               "train_runtime_s": round(seconds, 3),
               "sampling": {"generation_s": round(run.seconds["generation"], 3),
                            "judging_s": round(run.seconds["judging"], 3), "generated_tokens": run.generated_tokens}}
    summary.pop("run")
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))


def _builtin_rows_if_needed(cfg: TrainConfig, given: dict) -> list[dict]:
    """The built-in pairs, when they are the data and the embedded tokenizer is built from them."""
    if given["train_dataset"] is None and cfg.dataset is None:
        from preftune.data.builtin import builtin_preferences

        return builtin_preferences()
    return []


def _prepare(trainer, cfg: TrainConfig, tokenizer, prompts, held_out, out: Path, state: PartialState) -> RoundsRun:
    """π_0 (the given model, the config's, or the embedded one), the fixed reference, the judge."""
    initial = _load_model(cfg, trainer.given["model"], tokenizer, reward=False)
    check_prompts_fit(initial, [*prompts, *held_out])
    device = state.device
    initial.to(device).eval()
    spec = cfg.rounds
    reference = None
    if spec.reference == "initial" and not cfg.refresh_reference:
        reference = trainer.given["ref_model"]
        if reference is None and cfg.ref_model_name_or_path:
            reference = loading.load_causal_lm(cfg.ref_model_name_or_path, cfg)
        reference = initial if reference is None else reference
    elif trainer.given["ref_model"] is not None:
        raise ConfigError(f"{cfg.methods[0]}'s reference is the previous iterate"
                          f"{' (refresh_reference=true)' if cfg.refresh_reference else ''}; pass no ref_model")
    judge = resolve_judge(trainer.judge, cfg.judge, **judge_role(cfg), device=device)
    return RoundsRun(cfg, spec, out, tokenizer, initial, reference, judge, prompts, held_out, device,
                     callbacks=list(trainer.callbacks))


def _shown(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


def _sample_and_pair(run: RoundsRun, k: int, sampler: nn.Module) -> tuple[list[dict], dict]:
    """Round k's pairs and what the sampling and pairing did (main process)."""
    cfg, spec = run.cfg, run.spec
    prompts = round_prompts(run.prompts, k, cfg.prompts_per_round)
    n = cfg.num_generations_for_rounds
    began = time.perf_counter()
    with sampling_precision(cfg.generation_dtype, run.device, run.autocast):  # the samples it trains on
        rollout = generate(sampler, run.tokenizer, [r["prompt"] for r in prompts],
                           run.sampling(n, (cfg.seed * 1_000_003 + k) % 2**31),
                           prompt_ids=[r["prompt_ids"] for r in prompts], source="the training prompts")
    judged = time.perf_counter()
    win_probs = judge_rollout(run.judge, rollout, cfg.missing_eos_penalty)
    done = time.perf_counter()
    run.seconds["generation"] += judged - began
    run.seconds["judging"] += done - judged
    run.generated_tokens += sum(rollout.lengths)
    info: dict[str, Any] = {
        "prompts": len(prompts), "samples_per_prompt": n,
        "sampled_from": "the initial model" if spec.sampler == "initial" or k == 1 else f"round {k - 1}",
        "samples": {"score": sum(rollout.scores) / len(rollout), "length": sum(rollout.lengths) / len(rollout),
                    "eos_rate": sum(rollout.ended_with_eos) / len(rollout)},
        "seconds": {"generation": round(judged - began, 3), "judging": round(done - judged, 3)}}
    if spec.selection == "rso":
        rows, report, rate = rso_pairs(rollout, win_probs, cfg.rso_samples, cfg.rso_beta, cfg.rso_pairing,
                                       cfg.seed * 7919 + k)
        info["rso"] = {"beta": cfg.rso_beta, "accepted_per_prompt": cfg.rso_samples, "pairing": cfg.rso_pairing,
                       "acceptance_rate": rate}
        log.info("rounds: round %d, RSO: expected acceptance rate of the first pass %.4f (β = %g, %d of %d "
                 "candidates accepted per prompt)", k, rate, cfg.rso_beta, cfg.rso_samples, n)
    else:
        rows, report = pairs_from_rollout(rollout, "best_vs_worst", {"win_prob": win_probs})
    info["pairs"] = report.to_dict()
    log.info("rounds: round %d: %s", k, report)
    if not rows:
        raise DataError(f"round {k}", None, None, f"gave no pair to train on ({report}); sample more completions "
                        "(num_generations), at a higher temperature, or use a judge that tells them apart")
    return rows, info


def _run_round(run: RoundsRun, k: int, offset: int, initial_rollout: Rollout | None, trainer_class) -> dict:
    """Sample → judge → pairs → one run of the loop → evaluation, for round k; returns its record."""
    cfg, spec, state = run.cfg, run.spec, PartialState()
    rdir = round_dir(run.out, k)
    pairs_path = rdir / PAIRS_FILE
    previous = run.initial if k == 1 else None
    if k > 1:
        previous = loading.load_causal_lm(str(run.model_of(k - 1)), cfg).to(run.device).eval()
    record: dict[str, Any] = {"round": k}
    if state.is_main_process:
        rdir.mkdir(parents=True, exist_ok=True)
        # The run's own files in the round's folder, which the loop's run there does not record: an overwrite
        # deletes them, and nothing else a user may have put there.
        record_entries(run.out, [f"{rdir.name}/{name}" for name in (PAIRS_FILE, "sampling.json", ROUND_RECORD)])
        if pairs_path.exists():  # an interrupted round: its data is kept
            info = json.loads((rdir / "sampling.json").read_text())
            log.info("rounds: round %d reuses its pairs %s", k, pairs_path)
        else:
            sampler = run.initial if spec.sampler == "initial" else previous
            rows, info = _sample_and_pair(run, k, sampler)
            _write_json(rdir / "sampling.json", info)
            tmp = save_pairs(rows, pairs_path.with_name(PAIRS_FILE + ".tmp"))
            tmp.replace(pairs_path)
        record.update(info)
    state.wait_for_everyone()

    rows = [row for j in range(1 if cfg.accumulate_pairs else k, k + 1)
            for row in _read_pairs(round_dir(run.out, j) / PAIRS_FILE)]
    began = time.perf_counter()
    training = _train(run, k, offset, rows, previous, trainer_class)
    record["training"] = training
    record["seconds"] = {**record.get("seconds", {}), "training": round(time.perf_counter() - began, 3)}
    del previous

    if run.held_out and state.is_main_process:
        began = time.perf_counter()
        model = loading.load_causal_lm(str(run.model_of(k)), cfg).to(run.device).eval()
        with run.autocast():
            record["eval"] = evaluate_round(model, run.initial, run.tokenizer, run.held_out, run.judge,
                                            run.sampling(1, cfg.seed + 2), initial_rollout)
        record["seconds"]["evaluation"] = round(time.perf_counter() - began, 3)
        log.info("rounds: round %d on %d held-out prompts: %s", k, len(run.held_out), _shown(record["eval"]))
    if state.is_main_process:
        _write_json(rdir / ROUND_RECORD, record)
    state.wait_for_everyone()
    return record


def _train(run: RoundsRun, k: int, offset: int, rows: list[dict], previous: nn.Module, trainer_class) -> dict:
    """One run of the loop in round-k/ on ``rows``, from ``previous`` (π_{k−1}); returns its summary."""
    cfg, rdir = run.cfg, round_dir(run.out, k)
    summary_path = rdir / "summary.json"
    if summary_path.exists() and run.model_of(k).exists():  # trained before the interruption
        log.info("rounds: round %d was trained (%s); kept", k, run.model_of(k))
        return _training_record(json.loads(summary_path.read_text()))
    resume = bool(checkpoint.list_checkpoints(rdir))
    fixed = run.reference is not None
    round_cfg = replace(
        cfg, output_dir=str(rdir), dataset=None, eval_dataset=None, eval_split_size=0.0,
        resume_from_checkpoint=True if resume else None, overwrite_output_dir=not resume,
        ref_model_name_or_path=cfg.ref_model_name_or_path if fixed else None,
        save_merged_model=cfg.save_merged_model or cfg.use_peft, push_to_hub=False,  # the run pushes its last round
        run_name=f"{cfg.run_name or run.out.name}-round-{k}")
    if resume:
        log.info("rounds: round %d resumes its training from %s", k, checkpoint.list_checkpoints(rdir)[-1])
    # π_{k−1} is trained in place: round 1 trains a copy, π_0 stays as it is (the proposal, the reference).
    policy = copy.deepcopy(previous) if previous is run.initial else previous
    callbacks = [_RoundCallback(callback, offset, k) for callback in run.callbacks]
    trainer = trainer_class(round_cfg, model=policy, ref_model=run.reference, tokenizer=run.tokenizer,
                            train_dataset=rows, callbacks=callbacks)
    trainer.train_once()
    return _training_record(json.loads(summary_path.read_text()))


def _training_record(summary: dict) -> dict:
    return {key: summary.get(key) for key in ("global_step", "first_loss", "train", "train_runtime_s", "reference")}


class _RoundCallback:
    """A trainer callback seen through round k of a run of rounds: steps count over the whole run (round k's step
    s is ``offset + s``), logged and evaluation records carry ``round``, and ``on_train_end`` is left to the run
    of rounds (called once, with the last round's result)."""

    def __init__(self, callback, offset: int, k: int):
        self.callback, self.offset, self.k = callback, offset, k

    def on_step_end(self, step: int, model: nn.Module):
        step_end = getattr(self.callback, "on_step_end", None) or (self.callback if callable(self.callback) else None)
        return None if step_end is None else step_end(self.offset + step, model)

    def _record(self, record: dict) -> dict:
        step = record.get("step")
        return {**record, "step": None if step is None else self.offset + step, "round": self.k}

    def on_log(self, record: dict) -> None:
        if hasattr(self.callback, "on_log"):
            self.callback.on_log(self._record(record))

    def on_evaluate(self, record: dict) -> None:
        if hasattr(self.callback, "on_evaluate"):
            self.callback.on_evaluate(self._record(record))


def _link_final(out: Path, model: Path, state: PartialState) -> Path:
    """``final`` in the run folder, a link to the last round's model."""
    final = out / "final"
    if state.is_main_process:
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():
            raise RunDirError(f"{final} exists and is not the link a run of rounds writes; remove it")
        os.symlink(model.relative_to(out), final, target_is_directory=True)
    state.wait_for_everyone()
    return final


__all__ = ["train_rounds", "judge_rollout", "rso_pairs", "round_prompts", "load_prompts", "evaluate_round",
           "RoundsRun"]
