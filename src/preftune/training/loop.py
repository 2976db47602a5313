"""The one training loop, on Accelerate, for every preference method.

fetch batch → policy log-probs → reference log-probs → loss → step → log. Data preparation,
the reference strategy, checkpoints and tracking are calls to small helpers.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from preftune.config import TrainConfig
from preftune.data.batching import LengthGroupedSampler, TokenBudgetBatchSampler, example_lengths
from preftune.modeling.logprobs import LogProbModel
from preftune.modeling.reward import RewardModel
from preftune.training import checkpoint
from preftune.training.objective import LossSpec, batch_loss
from preftune.training.setup import RunInputs, prepare_inputs, uses_embedded_model
from preftune.training.tracking import MetricsLog, MetricWindow

log = logging.getLogger("preftune")


# Called after every optimizer step with (step, the unwrapped model); may return metrics to log.
StepCallback = Callable[[int, nn.Module], "dict[str, float] | None"]


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path | None
    global_step: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    first_loss: float | None = None


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                   eps=cfg.adam_epsilon)
    # The fused kernel is one pass over the parameters (≈8× faster than foreach on a 2-core CPU for 58M
    # parameters); it exists for CPU and CUDA tensors of floating dtype.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, fused=fused)


def _no_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu and xpu.is_available()))


def native_bf16() -> bool:
    """Whether this machine multiplies bf16 matrices in hardware: a CUDA GPU with bf16 (Ampere and later), or
    a CPU with AVX512-BF16 or AMX. Elsewhere bf16 autocast is emulated and slower than fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if not _no_accelerator_device():
        return False  # MPS / XPU: left to an explicit bf16=true
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the fallback
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(cfg: TrainConfig, embedded_model: bool) -> TrainConfig:
    """``bf16=None`` (the default) becomes True where bf16 is native (and fp16 is not asked for), as in TRL:
    bf16 autocast was ×1.5–1.6 faster than fp32 per pair for a 58M-parameter model on a 2-core AVX512-BF16 CPU
    (benchmarks/README.md). The embedded toy model stays fp32: its matmuls are too small for autocast's casts
    to pay (×0.7). The resolved value is written back, so config.yaml and the reference cache record it."""
    if cfg.bf16 is None:
        cfg.bf16 = not cfg.fp16 and cfg.dtype != "float16" and not embedded_model and native_bf16()
    return cfg


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    # Accelerate's state is a process-wide singleton; a second run in the same process (a notebook, the
    # tests) may use another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        # On a CPU-only machine, `torchrun --nproc_per_node N` gives N data-parallel processes (gloo).
        cpu=_no_accelerator_device(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=precision,
        log_with=cfg.report_to or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=str(Path(cfg.output_dir) / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def check_output_dir(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    out = Path(cfg.output_dir)
    finished = (out / "summary.json").exists() or (out / "final").exists()
    if finished and not cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
        raise FileExistsError(
            f"{out} already holds a finished run; set overwrite_output_dir=true or choose another output_dir"
        )
    if accelerator.is_main_process:
        if cfg.overwrite_output_dir and not cfg.resume_from_checkpoint and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


def build_train_loader(cfg: TrainConfig, dataset, collate: Callable[[list[dict]], dict[str, Tensor]],
                       drop_last: bool) -> tuple[DataLoader, TokenBudgetBatchSampler | None]:
    """Training batches of ``per_device_train_batch_size`` examples (shuffled or grouped by length), or of as many
    examples as fit in ``max_tokens_per_batch`` tokens; the token-budget sampler is returned too (or None).

    A micro-batch's loss is the mean over its examples, so under a budget — where the number of examples varies —
    every micro-batch still counts equally under gradient accumulation (and across processes)."""
    if cfg.max_tokens_per_batch is not None:
        budget = TokenBudgetBatchSampler(example_lengths(dataset), cfg.max_tokens_per_batch, cfg.seed)
        return DataLoader(dataset, batch_sampler=budget, collate_fn=collate), budget
    sampler = (LengthGroupedSampler(example_lengths(dataset), cfg.per_device_train_batch_size, cfg.seed)
               if cfg.group_by_length else None)
    return DataLoader(dataset, batch_size=cfg.per_device_train_batch_size, shuffle=sampler is None, sampler=sampler,
                      collate_fn=collate, drop_last=drop_last), None


class PreferenceTrainer:
    """Train a causal LM with any registered method.

    Everything is optional but the config: pass an in-memory ``model`` / ``ref_model`` / ``tokenizer`` /
    ``train_dataset`` / ``eval_dataset`` (a ``datasets.Dataset`` or a list of rows in any accepted
    format), or let the config name them, or leave both empty for the embedded default.
    """

    def __init__(self, config: TrainConfig, model=None, ref_model=None, tokenizer=None,
                 train_dataset=None, eval_dataset=None, callbacks: list[StepCallback] = ()):
        self.cfg = config.validate()
        embedded = uses_embedded_model(self.cfg, model)
        self.accelerator = make_accelerator(resolve_precision(self.cfg, embedded_model=embedded))
        self.given = dict(model=model, ref_model=ref_model, tokenizer=tokenizer,
                          train_dataset=train_dataset, eval_dataset=eval_dataset)
        self.callbacks = list(callbacks)

    # ------------------------------------------------------------------------------------------------
    def train(self) -> RunResult:
        cfg, acc = self.cfg, self.accelerator
        set_seed(cfg.seed)
        out = check_output_dir(cfg, acc)
        if acc.is_main_process:
            cfg.save(out / "config.yaml")
        inputs: RunInputs = prepare_inputs(cfg, acc, **self.given)
        spec = LossSpec.from_config(cfg)
        collate = inputs.collator

        policy = (RewardModel if spec.model == "reward" else LogProbModel)(inputs.model, cfg.logprob_chunk_size)
        optimizer = build_optimizer(cfg, policy)
        train_dl, budget = build_train_loader(cfg, inputs.train, collate, drop_last=spec.kind == "unpaired")
        eval_dl = (DataLoader(inputs.eval, batch_size=cfg.per_device_eval_batch_size, collate_fn=collate,
                              drop_last=spec.kind == "unpaired") if inputs.eval is not None else None)
        total_steps, num_epochs = self._schedule_length(len(train_dl))
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
        # Accelerate steps a prepared scheduler once per process per optimizer step; size it to match.
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup * acc.num_processes,
                                  num_training_steps=total_steps * acc.num_processes,
                                  scheduler_specific_kwargs=cfg.scheduler_kwargs(acc.num_processes))
        policy, optimizer, train_dl, scheduler = acc.prepare(policy, optimizer, train_dl, scheduler)
        if eval_dl is not None:
            eval_dl = acc.prepare(eval_dl)
        reference = inputs.make_reference(policy, acc)
        if hasattr(reference, "module"):
            acc.register_for_checkpointing(reference.module)

        state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0}
        resume = checkpoint.resolve_resume(cfg.resume_from_checkpoint, out)
        if resume is not None:
            state = checkpoint.load_checkpoint(acc, resume)
            log.info("resumed from %s at step %d", resume, state["global_step"])

        if acc.is_main_process:
            run_name = cfg.run_name or out.name
            acc.init_trackers("preftune", config=_tracker_config(cfg),
                              init_kwargs={"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}})
        metrics_log = MetricsLog(out / "metrics.jsonl", acc)
        self._log_start(inputs, reference, total_steps, num_epochs, budget)

        window = MetricWindow()
        result = RunResult(out, None, state["global_step"])
        bar = tqdm(total=total_steps, initial=state["global_step"], desc=f"{'+'.join(cfg.methods)}",
                   disable=not acc.is_local_main_process or cfg.disable_tqdm, dynamic_ncols=True)
        policy.train()
        started, pairs_seen, tokens_seen, last_log = time.perf_counter(), 0, 0, time.perf_counter()
        step = state["global_step"]
        for epoch in range(state["epoch"], num_epochs):
            train_dl.set_epoch(epoch)
            if budget is not None:  # under several processes Accelerate's shard does not pass set_epoch on to it
                budget.set_epoch(epoch)
            skip = state["batches_in_epoch"] if epoch == state["epoch"] else 0
            batches = acc.skip_first_batches(train_dl, skip) if skip else train_dl
            for batch_index, batch in enumerate(batches, start=skip):
                with acc.accumulate(policy):
                    loss = batch_loss(policy, reference, batch, spec, window)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                        window.add("grad_norm", torch.as_tensor(grad_norm, dtype=torch.float32).reshape(1))
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                pairs_seen += spec.examples(batch)
                tokens_seen += int(batch["num_input_tokens"].sum())
                if result.first_loss is None:
                    result.first_loss = loss.item()
                if not acc.sync_gradients:
                    continue
                step += 1
                bar.update(1)
                state = {"global_step": step, "epoch": epoch, "batches_in_epoch": batch_index + 1}
                if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
                    reference.sync(acc.unwrap_model(policy).model, cfg.ref_model_mixup_alpha)
                self._run_callbacks(step, acc.unwrap_model(policy).model, metrics_log)
                if step % cfg.logging_steps == 0 or step == total_steps:
                    now = time.perf_counter()
                    record = {"step": step, "epoch": round(epoch + (batch_index + 1) / len(train_dl), 4),
                              "learning_rate": scheduler.get_last_lr()[0], **window.values(acc),
                              f"{spec.unit}_per_second": pairs_seen * acc.num_processes / (now - last_log),
                              "tokens_per_second": tokens_seen * acc.num_processes / (now - last_log)}
                    pairs_seen, tokens_seen, last_log = 0, 0, now
                    metrics_log.write(record)
                    result.train_metrics = record
                    speed = record[f"{spec.unit}_per_second"]
                    shown = {"loss": f"{record['loss']:.4f}", f"{spec.unit}/s": f"{speed:.1f}"}
                    if "rewards/accuracies" in record:
                        shown["acc"] = f"{record['rewards/accuracies']:.2f}"
                    bar.set_postfix(shown)
                if eval_dl is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
                    result.eval_metrics = self._evaluate(policy, reference, eval_dl, spec, step, metrics_log)
                if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                    checkpoint.save_checkpoint(acc, out, step, state, cfg.save_total_limit)
                if step >= total_steps:
                    break
            if step >= total_steps:
                break
        bar.close()
        train_seconds = time.perf_counter() - started

        if eval_dl is not None and not (cfg.eval_steps and step % cfg.eval_steps == 0):
            result.eval_metrics = self._evaluate(policy, reference, eval_dl, spec, step, metrics_log)
        if cfg.save_steps:
            checkpoint.save_checkpoint(acc, out, step, {**state, "epoch": num_epochs, "batches_in_epoch": 0},
                                       cfg.save_total_limit)
        result.final_dir = checkpoint.export_final(acc, policy, inputs.tokenizer, out, cfg.save_merged_model)
        result.global_step = step
        if acc.is_main_process:
            summary = {"global_step": step, "train_runtime_s": round(train_seconds, 3),
                       "first_loss": result.first_loss, "train": result.train_metrics,
                       "eval": result.eval_metrics, "reference": reference.name, "methods": cfg.methods,
                       "parameters": inputs.parameter_counts, "data": inputs.data_reports,
                       "layout": inputs.collator.describe(), "final_dir": str(result.final_dir)}
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        acc.end_training()
        return result

    # ------------------------------------------------------------------------------------------------
    def _schedule_length(self, batches_per_epoch: int) -> tuple[int, int]:
        cfg = self.cfg
        per_epoch = max(1, math.ceil(batches_per_epoch / self.accelerator.num_processes
                                     / cfg.gradient_accumulation_steps))
        if cfg.max_steps > 0:
            return cfg.max_steps, math.ceil(cfg.max_steps / per_epoch)
        return math.ceil(per_epoch * cfg.num_train_epochs), math.ceil(cfg.num_train_epochs)

    def _run_callbacks(self, step: int, model: nn.Module, metrics_log: MetricsLog) -> None:
        """External evaluations (generation, judges, …): their numbers go into metrics.jsonl."""
        for callback in self.callbacks:
            was_training = model.training
            record = callback(step, model)
            model.train(was_training)
            if record:
                metrics_log.write({"step": step, **record})

    @torch.no_grad()
    def _evaluate(self, policy, reference, eval_dl, spec, step, metrics_log) -> dict[str, float]:
        policy.eval()
        window = MetricWindow()
        for batch in eval_dl:
            batch_loss(policy, reference, batch, spec, window)
        policy.train()
        record = {"step": step, **{f"eval_{k}": v for k, v in window.values(self.accelerator).items()}}
        metrics_log.write(record)
        return record

    def _log_start(self, inputs: RunInputs, reference, total_steps: int, num_epochs: int,
                   budget: TokenBudgetBatchSampler | None) -> None:
        if not self.accelerator.is_main_process:
            return
        trainable, total = inputs.parameter_counts
        log.info("methods %s | reference: %s | %d train rows, %s eval rows | %d steps over %d epoch(s) | "
                 "%d processes | trainable params %s of %s", "+".join(self.cfg.methods), reference.name,
                 len(inputs.train), len(inputs.eval) if inputs.eval is not None else 0, total_steps,
                 num_epochs, self.accelerator.num_processes, f"{trainable:,}", f"{total:,}")
        log.info("layout: %s", inputs.collator.describe())
        cfg = self.cfg
        if budget is not None:
            log.info("batches: up to %d tokens each, %d per epoch; %d example(s) longer than that train alone",
                     budget.max_tokens, len(budget), budget.over_budget)
        else:
            log.info("batches: %d examples each%s", cfg.per_device_train_batch_size,
                     ", grouped by length" if cfg.group_by_length else "")
        for report in inputs.data_reports.values():
            log.info("%s", report)


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """Trackers accept scalars and strings only."""
    flat = {}
    for key, value in cfg.to_dict().items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def train(config: TrainConfig | dict | str | Path, **objects) -> RunResult:
    """Train from a config object, a mapping of config keys, or a YAML path; see :class:`PreferenceTrainer`."""
    from preftune.config import build_config, load_config

    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = build_config(config)
    return PreferenceTrainer(config, **objects).train()
