"""Everything a run needs before its first step: tokenizer, model, tokenized data, reference strategy.

Objects passed in memory win over paths in the config; with neither, the embedded default is used.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from preftune.config import Resolved, TrainConfig, is_template_text
from preftune.data import formats, tokenize
from preftune.data.batching import PreferenceCollator
from preftune.errors import ConfigError, DataError, ModelError
from preftune.methods.registry import get_method, run_data, run_extras
from preftune.modeling import loading, reference
from preftune.modeling.fused_mlp import fuse_gated_mlps
from preftune.modeling.logprobs import (
    MASK_IMPLEMENTATIONS,
    LogProbModel,
    attention_implementation,
    max_positions,
    model_inputs,
    unwrap_causal_lm,
)
from preftune.rollout.judges import check_judge, default_judge
from preftune.training.objective import LossSpec

log = logging.getLogger("preftune")


def cache_root(cfg: TrainConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("PREFTUNE_CACHE") or Path.home() / ".cache" / "preftune")


@dataclass
class RunInputs:
    tokenizer: Any
    model: nn.Module
    train: datasets.Dataset
    eval: datasets.Dataset | None
    collator: PreferenceCollator
    make_reference: Callable[[nn.Module, Accelerator], Any]
    parameter_counts: tuple[int, int]
    data_reports: dict[str, str] = field(default_factory=dict)
    data_fingerprints: dict[str, str] = field(default_factory=dict)  # split → tokenized data fingerprint
    reference_label: str = "none"
    resolved: Resolved = field(default_factory=Resolved)  # the run's choices, the model's layout included


def make_collator(cfg: TrainConfig, tokenizer, model: nn.Module, sft: bool = False) -> PreferenceCollator:
    """The fastest correct layout by default: prefix sharing and packing wherever the attention takes 4D masks."""
    impl = attention_implementation(unwrap_causal_lm(model))
    supported = impl in MASK_IMPLEMENTATIONS

    def resolve(requested: bool | None, name: str) -> bool:
        if requested and not supported:
            raise ConfigError(f"{name}=true needs attn_implementation in {MASK_IMPLEMENTATIONS}, the model uses {impl}")
        return supported if requested is None else requested

    return PreferenceCollator(tokenizer.pad_token_id, prefix_sharing=resolve(cfg.prefix_sharing, "prefix_sharing"),
                              padding_free=resolve(cfg.padding_free, "padding_free"), sft=sft,
                              extras=() if cfg.is_online else run_extras(cfg.methods))


def _fuse_mlps(cfg: TrainConfig, model: nn.Module, accelerator: Accelerator) -> bool:
    """On by default; not under DeepSpeed ZeRO-3, which gathers each weight in its own module's forward hook.
    Returns whether any MLP was fused."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    zero3 = plugin is not None and getattr(plugin, "zero_stage", 0) == 3
    if cfg.fused_mlp and zero3:
        raise ConfigError("fused_mlp=true bypasses down_proj's forward, where DeepSpeed ZeRO-3 gathers its weight; "
                          "leave fused_mlp unset under ZeRO-3")
    if cfg.fused_mlp is False or zero3:
        return False
    count = fuse_gated_mlps(model)
    if count:
        log.info("fused gated MLPs: %d layers keep act(gate)·up for backward as gate and up only", count)
    elif cfg.fused_mlp:
        log.warning("fused_mlp=true: no MLP of this model has the plain down(act(gate(x)) * up(x)) form; unchanged")
    return count > 0


def _as_dataset(rows, split: str | None = None, name: str = "train_dataset") -> datasets.Dataset:
    """A ``datasets.Dataset``, a ``DatasetDict`` (its ``split``) or a list of rows, as a Dataset."""
    if isinstance(rows, datasets.DatasetDict):
        if split not in rows:
            raise formats.DataError(name, None, None, f"is a DatasetDict without the split {split!r}; it has "
                                    f"{sorted(rows)}: set dataset_split (eval_split for eval_dataset)")
        return rows[split]
    return rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))


TRAIN_SPLIT_KEY = "dataset_split (TRL: dataset_train_split)"
EVAL_SPLIT_KEY = "eval_split (TRL: dataset_test_split)"


def load_train_rows(cfg: TrainConfig) -> datasets.Dataset:
    """The rows of ``cfg.dataset``, split ``dataset_split`` (a file has one split, ``train``)."""
    return formats.load_rows(cfg.dataset, cfg.dataset_split, TRAIN_SPLIT_KEY)


def load_eval_rows(cfg: TrainConfig) -> datasets.Dataset:
    """The rows of ``cfg.eval_dataset``, split ``eval_split``.

    A file has one split, ``train`` (all its rows). An evaluation file other than the training data is read whole
    under eval_split's default (``test``, the Hub's name); any other split of a file, and the test split of the
    training file itself (TRL's ``dataset_test_split`` with a local ``dataset_name``), is an error naming the key:
    reading the file would evaluate on the training rows."""
    own_file = Path(cfg.eval_dataset).expanduser().is_file() and not _same_path(cfg.eval_dataset, cfg.dataset)
    split = "train" if own_file and cfg.eval_split == "test" else cfg.eval_split
    return formats.load_rows(cfg.eval_dataset, split, EVAL_SPLIT_KEY)


def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def hold_out(source_rows: Sequence[int], size: float, seed: int, source: str, unit: str = "rows") -> np.ndarray:
    """Which rows ``eval_split_size`` holds out, as a boolean mask over ``source_rows`` (each row's number in its
    file), for every method: of the n distinct numbers, the ``ceil(size · n)`` whose keys ``mix(number ⊕ mix(seed))``
    (SplitMix64) are smallest. Whether a row is held out depends on its number, the seed and which rows are present,
    never on their order; rows that share a number (a pair read as two KTO rows) stay on one side. So a prompt-only
    file loses the same prompts to evaluation in GRPO, Online DPO and the rounds, and a preference file the same
    pairs in every offline method that keeps the same rows. A split that would leave nothing to train on is a
    :class:`DataError` naming ``source`` (``unit`` says what was counted)."""
    numbers = np.asarray(source_rows, dtype=np.int64)
    distinct = np.unique(numbers)
    # Rounded up as datasets' train_test_split counts test_size, float noise aside (0.1 · 30 = 3.0000000000000004)
    count = math.ceil(round(size * len(distinct), 9))
    if count >= len(distinct):
        raise formats.DataError(source, None, None, f"eval_split_size={size} of its {len(distinct)} {unit} (after "
                                f"tokenization) holds out {count}, leaving none to train on; give more rows, a "
                                "smaller eval_split_size, or an eval_dataset")
    with np.errstate(over="ignore"):
        salt = _mix(np.array([seed % 2**64], dtype=np.uint64))
        keys = _mix(distinct.astype(np.uint64) ^ salt)
    return np.isin(numbers, distinct[np.argsort(keys, kind="stable")[:count]])


# The columns that make a tokenized example what it is (the KL columns of unpaired data are drawn, not given).
_IDENTITY_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "label")


def count_overlap(train: datasets.Dataset, evaluation: datasets.Dataset) -> int:
    """How many evaluation examples are also training examples (the same prompt and completion token ids), by a
    64-bit hash of each example's tokens (a false match has probability ≈ rows² / 2⁶⁴)."""
    columns = [c for c in _IDENTITY_COLUMNS if c in train.column_names and c in evaluation.column_names]
    if not columns or len(evaluation) == 0:
        return 0
    seen = _example_hashes(train, columns)
    return int(np.isin(_example_hashes(evaluation, columns), seen).sum())


def _example_hashes(data: datasets.Dataset, columns: list[str]) -> np.ndarray:
    """[rows] uint64: per column, Σ over positions of mix(token, column, position) (wrapping sums), then the columns
    and lengths combined; vectorised over Arrow's flat token buffers (20,000 pairs of ~440 tokens: 0.8 s on one CPU
    core, against 7 s for a loop over rows)."""
    table = data.with_format("arrow")[:]
    hashes = np.zeros(len(table), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for index, name in enumerate(columns):
            column = table.column(name).combine_chunks()
            if hasattr(column, "flatten"):
                values = column.flatten().to_numpy(zero_copy_only=False).astype(np.uint64)
                lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
            else:  # a scalar column (label)
                values = column.to_numpy(zero_copy_only=False).astype(np.uint64)
                lengths = np.ones(len(column), np.int64)
            ends = np.cumsum(lengths)
            positions = (np.arange(len(values)) - np.repeat(ends - lengths, lengths)).astype(np.uint64)
            mixed = _mix(values ^ _mix(positions + np.uint64(index << 32)))
            sums = np.concatenate([np.zeros(1, np.uint64), np.cumsum(mixed, dtype=np.uint64)])
            column_hash = sums[ends] - sums[ends - lengths] + _mix(lengths.astype(np.uint64) + np.uint64(index))
            hashes = _mix(hashes ^ column_hash)
    return hashes


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a fixed bijection of uint64 that spreads every input bit."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uses_embedded_model(cfg: TrainConfig, model) -> bool:
    """No model object and no model path: the run trains the embedded tiny Llama (preftune.modeling.tiny)."""
    return model is None and not cfg.model_name_or_path


def uses_embedded_world(cfg: TrainConfig, model, train_dataset) -> bool:
    """Neither model nor data given: the embedded tiny Llama on the built-in preferences, the demo world (judged by
    its gold reward, :func:`preftune.rollout.judges.default_judge`)."""
    return uses_embedded_model(cfg, model) and train_dataset is None and cfg.dataset is None


def settle_judge(cfg: TrainConfig, judge, model, train_dataset) -> str | None:
    """The judge spec of a run that samples (online methods, PPO, rounds): the config's, else the embedded world's
    gold reward when no judge is given at all (``judge``: the trainer's judge= object); one message when there is
    none, before anything loads. Recorded as :attr:`preftune.config.Resolved.judge` (config.yaml says what judged the
    run); the algorithm loads it (:func:`preftune.rollout.judges.resolve_judge`)."""
    spec = default_judge(judge, cfg.judge, embedded_world=uses_embedded_world(cfg, model, train_dataset))
    check_judge(judge, spec, **judge_role(cfg))
    return spec


def judge_role(cfg: TrainConfig) -> dict[str, str] | None:
    """What the run asks of a judge, as :func:`preftune.rollout.judges.resolve_judge`'s keywords: ``who`` (the
    method, for messages) and ``pairwise`` — a pairwise judge is kept by the rounds (they read its preferences), scores
    the two samples of a prompt for Online DPO, and is refused by GRPO, RLOO and PPO (their advantages read one score
    per completion). None when the run samples nothing (offline methods)."""
    if cfg.rounds is None and not cfg.is_online:
        return None
    who = f"method {'+'.join(cfg.methods)}" + (" with online=true" if cfg.online else "")
    if cfg.rounds is not None:
        return {"who": who, "pairwise": "keep"}
    return {"who": who, "pairwise": "pairs" if run_data(cfg.methods) == "paired" else "refuse"}


def _load_tokenizer(cfg: TrainConfig, tokenizer, builtin_rows):
    if tokenizer is None:
        if cfg.tokenizer_name_or_path or cfg.model_name_or_path:
            if cfg.model_name_or_path:  # the model's path first: a missing model is the first thing to fix
                loading.check_model_path("model_name_or_path", cfg.model_name_or_path)
            if cfg.tokenizer_name_or_path:
                loading.check_model_path("tokenizer_name_or_path", cfg.tokenizer_name_or_path)
            tokenizer = loading.load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path,
                                               cfg.trust_remote_code)
        else:
            from preftune.modeling.tiny import default_tokenizer

            tokenizer = default_tokenizer(builtin_rows)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template is not None:  # before tokenization: the cache key and final/ see the template used
        tokenizer.chat_template = read_chat_template(cfg.chat_template)
    return tokenizer


def read_chat_template(value: str) -> str:
    """``chat_template`` as the Jinja text: the value itself when it is a template, else the file it names."""
    if is_template_text(value):
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"chat_template: {value} could not be read ({err}); give a UTF-8 Jinja file or the "
                          "template itself") from None


def _load_model(cfg: TrainConfig, model, tokenizer, reward: bool, bf16: bool = False):
    if (cfg.load_in_4bit or cfg.load_in_8bit) and (model is not None or not cfg.model_name_or_path):
        raise ConfigError(f"load_in_{4 if cfg.load_in_4bit else 8}bit quantizes the model as it loads from "
                          "model_name_or_path; a model passed in memory, or the embedded one, is not quantized: give "
                          "model_name_or_path (a folder written by save_pretrained, or a Hub id)")
    if uses_embedded_model(cfg, model):
        from preftune.modeling.tiny import default_model

        log.info("no model_name_or_path: using the embedded tiny Llama with random weights")
        model = default_model(tokenizer, seed=cfg.seed)
    elif model is None:
        loading.check_model_path("model_name_or_path", cfg.model_name_or_path)
        model = (loading.load_reward_model if reward else loading.load_causal_lm)(cfg.model_name_or_path, cfg,
                                                                                  bf16=bf16)
    if reward and not hasattr(model, "score"):
        log.info("reward modelling: the causal LM's body gets a new one-output score head")
        model = loading.as_reward_model(model)
    return model


def _rows_for(kind: str, normalised: datasets.Dataset, source: str, cfg: TrainConfig, reports, name: str):
    """Canonical rows in the shape the methods train on: prompts for online methods (they sample their own
    completions), pairs split for KTO, chosen sides for SFT."""
    if cfg.is_online:
        return formats.to_prompts(normalised)
    if formats.is_prompt_only(normalised):
        raise formats.DataError(source, None, None, f"holds prompts only; {cfg.methods} train on completions. "
                                "To sample them from the policy during training, use method=online_dpo (or "
                                "online=true), rloo or grpo with a judge")
    paired = formats.is_paired(normalised)
    if kind == "paired" and not paired:
        raise formats.DataError(f"{source}: method {cfg.methods} needs paired rows (prompt, chosen, rejected); "
                                "this dataset is unpaired (prompt, completion[, label])")
    if kind == "unpaired" and paired:
        return formats.paired_to_unpaired(normalised)
    if kind == "sft":
        if paired:
            return formats.paired_to_sft(normalised)
        desirable = normalised.filter(lambda label: label, input_columns="label", desc="Keeping desirable rows")
        if len(desirable) < len(normalised):
            reports[f"{name}/sft"] = (f"{source}: SFT trains on the {len(desirable)} desirable rows; "
                                      f"{len(normalised) - len(desirable)} undesirable rows left out")
        return desirable
    return normalised


def _prepare_split(cfg: TrainConfig, rows: datasets.Dataset, source: str, tokenizer, kind: str, reports,
                   name: str) -> datasets.Dataset:
    normalised, report = formats.normalise(rows, source, skip_invalid=cfg.skip_invalid_rows)
    extras = () if cfg.is_online else run_extras(cfg.methods)
    if extras:  # columns the loss reads (SPPO's win probabilities) are not ignored: attach_extras carries them
        report.ignored_columns = [c for c in report.ignored_columns if c not in extras]
    reports[f"{name}/rows"] = str(report) + (f"; read by the loss: {', '.join(extras)}" if extras else "")
    if report.rows_out == 0:  # only under skip_invalid_rows: otherwise the first bad row has raised
        first = "; ".join(report.first_problem.values())
        raise formats.DataError(source, None, None, f"kept 0 of {report.rows_in} rows: every row is invalid "
                                f"({', '.join(f'{n} {r}' for r, n in report.skipped.items())}); first of each: "
                                f"{first}; fix the rows (skip_invalid_rows=false names the first bad row)")
    normalised = _rows_for(kind, normalised, source, cfg, reports, name)
    tokenized, tok_report = tokenize.tokenize_rows(
        normalised, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        cache_dir=cache_root(cfg) / "tokenized", source=source, kl_completions=kind == "unpaired",
        max_completion_length=cfg.max_completion_length,
    )
    reports[f"{name}/tokens"] = str(tok_report)
    if len(tokenized) == 0:
        raise formats.DataError(source, None, None, f"no row is left to train on: {tok_report}; raise max_length "
                                "or set max_prompt_length so that long prompts are cut instead of dropped")
    if extras:
        tokenized = attach_extras(tokenized, rows, extras, source, cfg.methods)
    keep = [c for c in tokenized.column_names
            if c.endswith(("_ids", "_mask")) or c in ("label", formats.SOURCE_ROW, *extras)
            or (cfg.is_online and c == "prompt")]
    return tokenized.select_columns(keep)


def attach_extras(tokenized: datasets.Dataset, raw: datasets.Dataset, names: tuple[str, ...], source: str,
                  methods: list[str]) -> datasets.Dataset:
    """Add the per-example columns the run's loss reads (the registry's ``extras``, e.g. SPPO's win
    probabilities) to the tokenized rows, each row's value read from its source row in ``raw``: normalisation
    and tokenization keep only the canonical columns. Every value must be a finite number."""
    missing = [name for name in names if name not in raw.column_names]
    if missing:
        raise formats.DataError(source, None, None, f"has no column {', '.join(map(repr, missing))}; {methods} read "
                                f"{', '.join(names)} in every row (columns: {', '.join(raw.column_names)})")
    rows = tokenized[formats.SOURCE_ROW]
    for name in names:
        column = raw[name]
        values = []
        for row in rows:
            value = column[row]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise formats.DataError(source, row, name, f"must be a finite number, got {value!r}")
            values.append(float(value))
        tokenized = tokenized.add_column(name, values)
    return tokenized


def data_sources(cfg: TrainConfig, train_dataset=None, eval_dataset=None
                 ) -> tuple[tuple[datasets.Dataset, str], tuple[datasets.Dataset, str] | None]:
    """The run's rows and the name its messages give them, for every method (the rounds read their prompts here
    too): ``train_dataset`` (its ``dataset_split`` of a ``DatasetDict``), else ``dataset``, else the built-in
    preferences; and the evaluation rows, ``eval_dataset`` (given, or the config's; a given ``DatasetDict``'s
    ``eval_split`` when neither names one), or None."""
    if isinstance(train_dataset, datasets.DatasetDict) and eval_dataset is None and cfg.eval_dataset is None:
        eval_dataset = train_dataset.get(cfg.eval_split)  # its eval split, as the Hub's train/test layout suggests
    if train_dataset is not None:
        train = _as_dataset(train_dataset, cfg.dataset_split), "train_dataset"
    elif cfg.dataset is not None:
        train = load_train_rows(cfg), cfg.dataset
    else:
        from preftune.data.builtin import builtin_preferences

        train = datasets.Dataset.from_list(builtin_preferences()), "built-in preferences"
    if eval_dataset is None and cfg.eval_dataset is None:
        return train, None
    given = eval_dataset is not None
    rows = _as_dataset(eval_dataset, cfg.eval_split, "eval_dataset") if given else load_eval_rows(cfg)
    return train, (rows, str(cfg.eval_dataset or "eval_dataset"))


def _split_off_evaluation(cfg: TrainConfig, train: datasets.Dataset, source: str
                          ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The tokenized rows without, and with only, the rows :func:`hold_out` holds out (each side in file order)."""
    rows = (train.with_format("numpy")[formats.SOURCE_ROW] if formats.SOURCE_ROW in train.column_names
            else range(len(train)))
    held = hold_out(rows, cfg.eval_split_size, cfg.seed, source)
    return train.select(np.flatnonzero(~held)), train.select(np.flatnonzero(held))


def _report_overlap(train: datasets.Dataset, evaluation: datasets.Dataset, reports: dict[str, str]) -> None:
    """Count evaluation examples that are training examples: their metrics measure memorisation, not
    generalisation (the log warns, the summary and the model card say how many)."""
    overlap = count_overlap(train, evaluation)
    if overlap:
        reports["eval/overlap"] = (f"{overlap} of the {len(evaluation)} evaluation examples are also training "
                                   "examples (the same tokens)")
        log.warning("%s: the evaluation metrics partly measure the fit to training rows; for held-out metrics "
                    "give rows the run does not train on (eval_dataset, or eval_split_size)", reports["eval/overlap"])


def prepare_inputs(cfg: TrainConfig, accelerator: Accelerator, resolved: Resolved | None = None, model=None,
                   ref_model=None, tokenizer=None, train_dataset=None, eval_dataset=None) -> RunInputs:
    """Tokenizer → data (read, validated, tokenized: a bad file fails before any model loads) → model → layout →
    reference (precomputed and cached when it stays fixed). ``resolved``: the run's choices so far (by default the
    accelerator's precision and the config's judge); the inputs carry them with the layout and the reference's plan
    added (``RunInputs.resolved``), and ``cfg`` is left as it is."""
    resolved = resolved or Resolved(bf16=accelerator.mixed_precision == "bf16", judge=cfg.judge)
    check_fsdp(cfg, accelerator)
    builtin_rows = None
    if train_dataset is None and cfg.dataset is None:
        from preftune.data.builtin import builtin_preferences

        builtin_rows = builtin_preferences()
    reward = get_method(cfg.methods[0]).model == "reward"
    tokenizer = _load_tokenizer(cfg, tokenizer, builtin_rows or [])

    kind = run_data(cfg.methods)
    reports: dict[str, str] = {}
    (train_rows, train_source), given_eval = data_sources(cfg, train_dataset, eval_dataset)
    with accelerator.main_process_first():  # one process tokenizes and fills the cache, the others read it
        train = _prepare_split(cfg, train_rows, train_source, tokenizer, kind, reports, "train")
        evaluation = None if given_eval is None else _prepare_split(cfg, *given_eval, tokenizer, kind, reports, "eval")
    if evaluation is None and cfg.eval_split_size > 0:
        train, evaluation = _split_off_evaluation(cfg, train, train_source)
    if evaluation is not None:
        _report_overlap(train, evaluation, reports)
    data_fingerprints = {"train": train._fingerprint} | ({"eval": evaluation._fingerprint} if evaluation else {})

    model = _load_model(cfg, model, tokenizer, reward, bf16=resolved.bf16)
    check_model_fits(model, tokenizer, [(train_source, train)] + ([("eval", evaluation)] if evaluation else []),
                     budget=cfg.generation_budget if cfg.is_online else 0)
    model = _ready_for_training(cfg, model, accelerator, reward)
    fused = _fuse_mlps(cfg, model, accelerator)

    collator = make_collator(cfg, tokenizer, model, sft=kind == "sft")
    strategy = choose_reference(cfg, model, ref_model, bf16=resolved.bf16)
    resolved = dataclasses.replace(resolved, fused_mlp=fused, prefix_sharing=collator.prefix_sharing,
                                   padding_free=collator.padding_free,
                                   precompute_ref_log_probs=strategy.kind == "precompute")
    if strategy.source_model is not None and strategy.source_model is not model:
        loading.check_same_vocabulary(model, strategy.source_model)
    if strategy.kind == "precompute":
        live = _ReadOnlyReference(LogProbModel(strategy.source_model, cfg.logprob_chunk_size), accelerator,
                                  adapters_off=strategy.label == "adapters off")
        fingerprint = reference.model_fingerprint(strategy.source_model)
        train = attach_reference_logps(cfg, accelerator, live, train, kind, fingerprint, collator, resolved.bf16)
        if evaluation is not None:
            evaluation = attach_reference_logps(cfg, accelerator, live, evaluation, kind, fingerprint, collator,
                                                resolved.bf16)
        strategy.release()

    return RunInputs(tokenizer=tokenizer, model=model, train=train, eval=evaluation, collator=collator,
                     make_reference=strategy.build, parameter_counts=loading.count_parameters(model),
                     data_reports=reports, data_fingerprints=data_fingerprints, reference_label=strategy.label,
                     resolved=resolved)


def _ready_for_training(cfg: TrainConfig, model: nn.Module, accelerator: Accelerator, reward: bool) -> nn.Module:
    """Dropout off, gradient checkpointing and LoRA adapters as the config asks; FlexAttention refused on a CPU."""
    flex = attention_implementation(unwrap_causal_lm(model)) == "flex_attention"
    if flex and accelerator.device.type == "cpu":  # fail now, not at the first backward
        raise ConfigError("attn_implementation=flex_attention trains on GPUs only: torch has no FlexAttention "
                          "backward on CPU; use attn_implementation=sdpa (the default)")
    if cfg.disable_dropout:
        loading.disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_peft and not loading.is_peft_model(model):
        model = loading.add_lora(model, cfg, task="SEQ_CLS" if reward else "CAUSAL_LM")
    return model


def check_fsdp(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """What does not work on FSDP-sharded weights is refused before anything loads."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if cfg.save_merged_model:
        raise ConfigError("save_merged_model under FSDP: the adapters would be merged into sharded weights; train "
                          "with save_merged_model: false and merge the adapter in final/ afterwards (peft: "
                          "AutoPeftModelForCausalLM.from_pretrained(final).merge_and_unload().save_pretrained(...))")
    if cfg.load_in_4bit or cfg.load_in_8bit:
        raise ConfigError("load_in_4bit / load_in_8bit under FSDP: bitsandbytes' packed uint8 weights cannot be "
                          "sharded with the model's other parameters here; train QLoRA on one GPU per process with "
                          "DDP (examples/accelerate/ddp.yaml), or without quantization under FSDP")


def check_model_fits(model: nn.Module, tokenizer, splits: list[tuple[str, datasets.Dataset]],
                     budget: int = 0) -> None:
    """Fail before step 0, not with an index error inside the model: every token id must have an embedding, and
    every row must fit the model's positions (the prompt plus its longest completion; branches restart there)."""
    vocabulary = loading.vocabulary_size(model)
    if len(tokenizer) > vocabulary:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {vocabulary}; use the "
                         "model's own tokenizer (or resize its embeddings before training)")
    positions = max_positions(model)
    if not positions:
        return
    for source, data in splits:
        lengths = row_positions(data, budget)
        longest = int(np.argmax(lengths)) if len(lengths) else 0
        if len(lengths) and lengths[longest] > positions:
            row = data[longest].get(formats.SOURCE_ROW, longest)
            raise DataError(source, row, None, f"needs {lengths[longest]} positions (prompt plus its longest "
                            f"completion) but the model has {positions}; set max_length <= {positions}"
                            + (" or a smaller max_completion_length" if budget else ""))


def row_positions(data: datasets.Dataset, budget: int = 0) -> np.ndarray:
    """Positions each row needs: its prompt plus its longest completion (every layout restarts positions there),
    or plus ``budget`` for prompt-only rows (the completions an online method will sample)."""
    table = data.with_format("arrow")[:]
    prompt = table.column("prompt_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    completions = [table.column(c).combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
                   for c in data.column_names if c.endswith("_ids") and c != "prompt_ids"]
    return prompt + (np.max(np.stack(completions), axis=0) if completions else budget)


@dataclass
class ReferencePlan:
    """Which reference a run uses; ``build(policy, accelerator)`` gives the strategy the loop calls."""

    kind: str  # none | precompute | model | adapters
    source_model: nn.Module | None
    chunk_size: int
    label: str  # none | frozen copy | checkpoint | adapters off
    dtype: str | None = None  # reference_dtype: the held reference model cast to it

    def release(self) -> None:
        self.source_model = None  # precomputed columns replace the reference model: free its memory

    def build(self, policy: nn.Module, accelerator: Accelerator):
        if self.kind == "none":
            return reference.NoReference()
        if self.kind == "precompute":
            return reference.PrecomputedReference()
        if self.kind == "adapters":
            return reference.AdaptersOffReference(policy, accelerator.unwrap_model)
        if self.dtype is not None:  # a frozen copy, a loaded checkpoint or the ref_model given: cast in place
            self.source_model.to(getattr(torch, self.dtype))
        return reference.ModelReference(self.source_model, self.chunk_size, self.label,
                                        accelerator.autocast).to(accelerator.device)


class _ReadOnlyReference:
    """Reference log-probs from a model that must not be changed (the policy before training, or the
    explicit reference), used once to precompute: eval mode for the pass, adapters off under LoRA."""

    def __init__(self, module: LogProbModel, accelerator: Accelerator, adapters_off: bool):
        self.module, self.accelerator, self.adapters_off = module.to(accelerator.device), accelerator, adapters_off

    @torch.no_grad()
    def logps(self, batch, token_weights=None):
        was_training = self.module.training
        self.module.eval()
        adapters = self.module.model.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        with adapters, self.accelerator.autocast():
            out = self.module(**model_inputs(batch), token_weights=token_weights)["logps"]
        self.module.train(was_training)
        return out


def needs_reference(method, cfg: TrainConfig) -> bool:
    """Whether ``method`` reads reference log-probs in this run: not when the hyper-parameter that weighs its
    reference term is 0 (GRPO at β = 0 loads no reference, as in TRL)."""
    if not method.needs_reference:
        return False
    name = method.reference_weight
    if name is None:
        return True
    value = getattr(cfg, name)
    return (method.defaults[name] if value is None else value) != 0


def choose_reference(cfg: TrainConfig, model: nn.Module, ref_model: nn.Module | None,
                     bf16: bool = False) -> ReferencePlan:
    """Explicit checkpoint > adapters off (LoRA) > frozen copy; precomputed whenever it stays fixed. ``bf16``: the
    run's autocast (a quantized checkpoint computes in it)."""
    chunk = cfg.logprob_chunk_size
    if not any(needs_reference(get_method(m), cfg) for m in cfg.methods):
        return ReferencePlan("none", None, chunk, "none")
    if ref_model is None and cfg.ref_model_name_or_path:
        loading.check_model_path("ref_model_name_or_path", cfg.ref_model_name_or_path)
        ref_model = loading.load_causal_lm(cfg.ref_model_name_or_path, cfg, bf16=bf16)
    precompute = cfg.precompute_ref_log_probs
    if precompute is None:  # online methods score completions that do not exist before training; reference_dtype
        precompute = not cfg.sync_ref_model and not cfg.is_online and not cfg.reference_dtype  # asks to hold one
    if ref_model is not None:
        if cfg.disable_dropout:
            loading.disable_dropout(ref_model)
        return ReferencePlan("precompute" if precompute else "model", ref_model, chunk, "checkpoint",
                             cfg.reference_dtype)
    if loading.is_peft_model(model):
        return ReferencePlan("precompute" if precompute else "adapters", model, chunk, "adapters off")
    if precompute:  # the policy before its first step is the reference: no copy needed
        return ReferencePlan("precompute", model, chunk, "frozen copy")
    return ReferencePlan("model", copy.deepcopy(model), chunk, "frozen copy", cfg.reference_dtype)


def attach_reference_logps(cfg: TrainConfig, accelerator: Accelerator, live, data: datasets.Dataset,
                           kind: str, model_fp: str, collator: PreferenceCollator, bf16: bool) -> datasets.Dataset:
    """Add ``ref_*_logps`` columns: computed once (sharded over processes), cached on disk by fingerprints (the
    precision, ``bf16`` autocast or not, among them)."""
    names = reference.reference_columns(kind)
    key = reference.cache_key(model_fp, data._fingerprint, cfg.ld_alpha, bf16, cfg.fp16, kind, len(data))
    path = cache_root(cfg) / "reference" / f"{key}.npy"
    values = reference.load_cached(path, len(data))
    if values is None:
        values = _compute_reference_logps(cfg, accelerator, live, data, collator)
        if accelerator.is_main_process:
            reference.save_cached(path, values)
        log.info("reference log-probs computed for %d rows and cached at %s", len(data), path)
    else:
        log.info("reference log-probs read from cache %s", path)
    accelerator.wait_for_everyone()
    return data.add_column(names[0], values[:, 0].tolist()).add_column(names[1], values[:, 1].tolist())


@torch.no_grad()
def _compute_reference_logps(cfg, accelerator, live, data, collate: PreferenceCollator) -> np.ndarray:
    spec = LossSpec.from_config(cfg)
    shard = data.shard(num_shards=accelerator.num_processes, index=accelerator.process_index, contiguous=True)
    loader = DataLoader(shard, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate)
    rows = []
    for batch in tqdm(loader, desc="reference log-probs", disable=not accelerator.is_local_main_process
                      or cfg.disable_tqdm, dynamic_ncols=True):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        logps = live.logps(batch, spec.token_weights(batch)).float()
        n = logps.shape[0] // 2
        rows.append(torch.stack([logps[:n], logps[n:]], dim=1).cpu())
    local = torch.cat(rows).numpy() if rows else np.zeros((0, 2), dtype=np.float32)
    gathered = gather_object([local]) if accelerator.num_processes > 1 else [local]
    return np.concatenate(gathered).astype(np.float32)

