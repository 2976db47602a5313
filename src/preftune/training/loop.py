"""The one training loop, on Accelerate, for every preference method.

fetch batch → policy log-probs → reference log-probs → loss → step → log. Data preparation,
the reference strategy, checkpoints and tracking are calls to small helpers.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
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

from preftune.config import OPTIMIZERS, TrainConfig
from preftune.data.batching import LengthGroupedSampler, TokenBudgetBatchSampler, example_lengths
from preftune.errors import ConfigError, TrainingError
from preftune.methods.registry import METHODS, get_method
from preftune.modeling.logprobs import LogProbModel
from preftune.modeling.reward import RewardModel
from preftune.rollout.judges import CallableJudge, load_judge
from preftune.schedules import build_scheduler
from preftune.training import checkpoint, hub, memory
from preftune.training.fsdp import fsdp_on_cpu
from preftune.training.health import HealthCallback
from preftune.training.hf_callbacks import adapt_callbacks
from preftune.training.objective import LossSpec, NonFiniteLoss, batch_loss
from preftune.training.online import OnlineBatches
from preftune.training.online import summary as online_summary
from preftune.training.rundir import on_main_process, open_run_folder
from preftune.training.setup import RunInputs, prepare_inputs, uses_embedded_model
from preftune.training.tracking import MetricsLog, MetricWindow, obeys_disable_tqdm

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
    """The optimizer ``cfg.optim`` names (transformers' names, see ``config.OPTIMIZERS``) over the trainable
    parameters.

    Optimizer state per trainable parameter: AdamW keeps m and v in fp32 (8 bytes); bitsandbytes' 8-bit AdamW
    (Dettmers et al. 2022, arXiv 2110.02861) keeps them as 8-bit codes with one fp32 absmax per block of 256 values
    (2 + 8/256 ≈ 2.03 bytes; tensors under 4096 values keep fp32 states), dequantized for each update; the paged
    variants let the GPU driver move the states to CPU memory under memory pressure (plain states on a CPU);
    torchao's 8- and 4-bit AdamW keep 8- or 4-bit codes with per-block scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    spec = OPTIMIZERS[cfg.optim]
    if spec.name == "RMSprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                   eps=cfg.adam_epsilon)
    adam = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
                eps=cfg.adam_epsilon)
    if spec.module == "torch.optim":
        # The fused kernel is one pass over the parameters (≈8× faster than foreach on a 2-core CPU for 58M
        # parameters); it exists for CPU and CUDA tensors of floating dtype.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, fused=fused, **adam)
    return getattr(importlib.import_module(spec.module), spec.name)(params, **adam)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int, num_processes: int):
    """The config's learning-rate schedule over ``steps`` steps, warming up over ``warmup_steps`` (else
    ``warmup_ratio`` of them). Accelerate steps a prepared scheduler once per process per step, so its warm-up,
    its length and the step counts in ``lr_scheduler_kwargs`` are scaled by ``num_processes``."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
    return build_scheduler(cfg.lr_scheduler_type, optimizer, warmup * num_processes, steps * num_processes,
                           cfg.scheduler_kwargs(num_processes))


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


def launched_alone(num_processes: int, env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """What to tell a user whose ``accelerate launch --num_processes N`` started one process, else None.

    Accelerate's simple launcher (taken with ``--cpu``, or without GPUs) runs the script once unless MPI is set up
    (``--mpirun_hostfile``); it marks the process with ``ACCELERATE_USE_CPU``, and sets ``MASTER_ADDR`` when more
    than one process was asked for, but no ``WORLD_SIZE`` (torchrun, and ``accelerate launch --multi_gpu``, set it)."""
    if num_processes > 1 or "ACCELERATE_USE_CPU" not in env or "MASTER_ADDR" not in env or "WORLD_SIZE" in env:
        return None
    return ("accelerate launch asked for several processes but started 1 (MASTER_ADDR is set, WORLD_SIZE is not): "
            "with --cpu, or on a machine without GPUs, it runs the script once unless MPI is set up "
            "(--mpirun_hostfile), so this run trains on 1 process. For N processes on CPUs run `accelerate launch "
            "--multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N -m preftune.cli train ...`")


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    # Accelerate's state is a process-wide singleton; a second run in the same process (a notebook, the
    # tests) may use another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = fsdp_on_cpu(Accelerator(
        # On a CPU-only machine, `torchrun --nproc_per_node N` gives N data-parallel processes (gloo).
        cpu=_no_accelerator_device(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=precision,
        log_with=cfg.report_to or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=str(Path(cfg.output_dir) / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    ))
    if (alone := launched_alone(accelerator.num_processes)) is not None:
        log.warning("%s", alone)
    return accelerator


def build_train_loader(cfg: TrainConfig, dataset, collate: Callable[[list[dict]], dict[str, Tensor]],
                       ) -> tuple[DataLoader, TokenBudgetBatchSampler | None]:
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
                      collate_fn=collate), None


def own_loop(config: TrainConfig) -> type | None:
    """The trainer of a method trained by a loop of its own (the registry's ``loop``, e.g. ``ppo`` →
    :class:`preftune.training.ppo.Trainer`, a :class:`PreferenceTrainer` made of the same pieces), or None."""
    methods = config.methods
    loop = get_method(methods[0]).loop if methods else None
    return None if loop is None else importlib.import_module(f"preftune.training.{loop}").Trainer


def default_judge(cfg: TrainConfig, judge, embedded_world: bool, needs_judge: bool) -> bool:
    """Whether a run that needs a judge (online methods, PPO) and names none gets the embedded world's gold reward:
    only when model and data are both the embedded default, whose chosen replies are kind and rejected ones rude;
    the log says so."""
    if not needs_judge or judge is not None or cfg.judge or not embedded_world:
        return False
    log.info("no judge: the embedded default (tiny Llama, built-in preferences) is judged by its gold reward, "
             "judge=gold (VADER sentiment of prompt + completion); set judge to use another")
    return True


@dataclass
class Session:
    """Everything a trainer prepared once, which ``train``, ``evaluate`` and ``save_model`` share."""

    inputs: RunInputs
    spec: LossSpec
    policy: nn.Module  # prepared by Accelerate
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_dl: DataLoader
    budget: TokenBudgetBatchSampler | None
    reference: Any
    online: OnlineBatches | None
    total_steps: int
    num_epochs: int


class PreferenceTrainer:
    """Train a causal LM with any registered method.

    Everything is optional but the config: pass an in-memory ``model`` / ``ref_model`` / ``tokenizer`` /
    ``train_dataset`` / ``eval_dataset`` (a ``datasets.Dataset``, a ``DatasetDict`` or a list of rows in any accepted
    format), or let the config name them, or leave both empty for the embedded default. ``judge`` scores online
    methods' samples (a Judge, or a function of (prompts, completions)); ``callbacks`` are functions called after
    every optimizer step with ``(step, model)`` (their returned metrics are logged) or objects with any of
    ``on_train_begin(max_steps, model)``, ``on_step_end(step, model)``, ``on_log(record)``, ``on_evaluate(record)``
    and ``on_train_end(result)``; a
    ``transformers.TrainerCallback`` is called with the ``args, state, control`` it expects (training.hf_callbacks).
    Built in (``health_checks: true``): :class:`preftune.training.health.HealthCallback`, which reads every logged
    record and warns once per failing health check (log, progress bar, ``summary.json``'s ``health``).

    ``train()`` runs the loop; ``evaluate()`` gives the held-out metrics now (before, during or after training);
    ``save_model(path)`` writes the policy in Hugging Face format with its tokenizer; ``model`` is the policy.
    """

    def __new__(cls, config: TrainConfig, *args, **kwargs):
        # A method with a loop of its own (PPO) is trained by its trainer, a subclass: the same arguments.
        own = own_loop(config) if cls is PreferenceTrainer else None
        return super().__new__(own or cls)

    def __init__(self, config: TrainConfig, model=None, ref_model=None, tokenizer=None,
                 train_dataset=None, eval_dataset=None, callbacks: list = (), judge=None):
        # A copy: resolved choices (precision, layout, reference) are written into it, not into the caller's object.
        self.cfg = copy.deepcopy(config).validate()
        embedded = uses_embedded_model(self.cfg, model)
        self.accelerator = make_accelerator(resolve_precision(self.cfg, embedded_model=embedded))
        self.given = dict(model=model, ref_model=ref_model, tokenizer=tokenizer,
                          train_dataset=train_dataset, eval_dataset=eval_dataset)
        self.callbacks = adapt_callbacks(list(callbacks), self.cfg, self.accelerator.is_main_process)
        self.judge = judge  # online methods: a Judge or a function (prompts, completions) -> scores; else cfg.judge
        if default_judge(self.cfg, judge, embedded and train_dataset is None and self.cfg.dataset is None,
                         needs_judge=self.cfg.is_online):
            self.cfg.judge = "gold"  # written into config.yaml, so the run records what judged it
        if self.cfg.is_online and judge is None and not self.cfg.judge:
            raise ConfigError("online methods (online_dpo, rloo, grpo, online=true) score their samples with a judge: "
                              "set judge to a reward-model folder, 'module:function' or 'gold' (the demo world), "
                              "or pass judge= to the trainer")
        self.session: Session | None = None
        self.health: HealthCallback | None = None  # the built-in health checks of the current or last train()
        self.global_step = 0  # optimizer steps the policy has taken in this trainer: evaluate()'s step

    @property
    def model(self) -> nn.Module | None:
        """The policy (a Hugging Face model, or a PEFT model under LoRA); None before any data or model is loaded.
        A method trained in rounds has one model per round, on disk: asking for the one policy is a ConfigError
        that says where they are (rather than the initial model it was given)."""
        self._not_rounds("trainer.model")
        if self.session is None:
            return self.given["model"]
        return self.accelerator.unwrap_model(self.session.policy).model

    def _prepare(self) -> Session:
        """Data, model, layout, reference, optimizer, schedule: once, on first use."""
        if self.session is not None:
            return self.session
        cfg, acc = self.cfg, self.accelerator
        set_seed(cfg.seed)
        inputs: RunInputs = prepare_inputs(cfg, acc, **self.given)
        spec = LossSpec.from_config(cfg)
        policy = (RewardModel if spec.model == "reward" else LogProbModel)(inputs.model, cfg.logprob_chunk_size)
        optimizer = build_optimizer(cfg, policy)
        online = self._online_source(inputs, spec) if cfg.is_online else None
        if online is not None:  # prompts in; each micro-batch is sampled, judged and collated in the loop
            train_dl, budget = DataLoader(inputs.train, batch_size=cfg.per_device_train_batch_size, shuffle=True,
                                          collate_fn=list), None
        else:
            train_dl, budget = build_train_loader(cfg, inputs.train, inputs.collator)
        total_steps, num_epochs = self._schedule_length(len(train_dl))
        scheduler = make_scheduler(cfg, optimizer, total_steps, acc.num_processes)
        policy, optimizer, train_dl, scheduler = acc.prepare(policy, optimizer, train_dl, scheduler)
        self.session = Session(inputs, spec, policy, optimizer, scheduler, train_dl, budget,
                               inputs.make_reference(policy, acc), online, total_steps, num_epochs)
        return self.session

    # ------------------------------------------------------------------------------------------------
    @obeys_disable_tqdm
    def train(self) -> RunResult:
        """One run of the loop; a method trained in rounds (RSO, SPPO, iterative DPO) runs its rounds above the
        loop, one run of it per round (:mod:`preftune.training.rounds`). With ``push_to_hub``, what would stop the
        upload at the end (offline mode, no token, no network) stops the run now, before anything is loaded."""
        on_main_process(self.accelerator, lambda: hub.check_push(self.cfg))
        if self.cfg.rounds is not None:
            from preftune.training.rounds import train_rounds

            return train_rounds(self)
        return self.train_once()

    def train_once(self) -> RunResult:
        """One run of the loop in ``output_dir``, whatever the method."""
        out, resume, lock = open_run_folder(self.cfg, self.accelerator)
        try:
            return self._train(out, resume)
        finally:
            if lock is not None:
                lock.release()

    def _not_rounds(self, what: str) -> None:
        # A run of rounds holds one model per round, not one session: its records say what each round did.
        if self.cfg.rounds is not None and self.session is None:
            raise ConfigError(f"{what} works on one run of the loop; {self.cfg.methods[0]} trains in rounds: each "
                              "round's held-out evaluation is in output_dir/rounds.json (set eval_split_size or "
                              "eval_dataset), its model in output_dir/round-k/final, the last one in output_dir/final")

    @obeys_disable_tqdm
    def evaluate(self) -> dict[str, float]:
        """The held-out metrics of the policy as it is now (``eval_``-prefixed, with ``eval_runtime``, and ``step``:
        the optimizer steps it has taken here, 0 before ``train()``); needs an evaluation set (``eval_dataset``, or
        ``eval_split_size``)."""
        self._not_rounds("evaluate()")
        session = self._prepare()
        if session.inputs.eval is None:
            raise ConfigError("evaluate() needs held-out data: pass eval_dataset, or set eval_dataset or "
                              "eval_split_size in the config")
        return self._evaluate(session, step=self.global_step, metrics_log=None)

    @obeys_disable_tqdm
    def save_model(self, path: str | Path) -> Path:
        """The policy in Hugging Face format (a PEFT adapter under LoRA) with its tokenizer, written atomically."""
        self._not_rounds("save_model()")
        session = self._prepare()
        return checkpoint.save_pretrained(self.accelerator, session.policy, session.inputs.tokenizer, Path(path))

    def _train(self, out: Path, resume: Path | None) -> RunResult:
        cfg, acc = self.cfg, self.accelerator
        saved = checkpoint.read_state(resume) if resume is not None else None
        session = self._prepare()
        inputs, spec, online = session.inputs, session.spec, session.online
        policy, optimizer, scheduler, train_dl = session.policy, session.optimizer, session.scheduler, session.train_dl
        budget, reference, total_steps, num_epochs = (session.budget, session.reference, session.total_steps,
                                                      session.num_epochs)
        fingerprint = checkpoint.run_fingerprint(effective_config(cfg), inputs.data_fingerprints)
        if saved is not None:
            checkpoint.check_same_run(resume, saved, fingerprint)
        elif acc.is_main_process:  # a resumed run keeps the config.yaml it started with
            cfg.save(out / "config.yaml")
        moving_reference = reference.module if cfg.sync_ref_model else None  # TR-DPO's reference is state too
        held = lambda: memory.one_loop(acc.unwrap_model(policy).model, optimizer, reference,  # noqa: E731
                                       (inputs.train, inputs.eval))
        if acc.is_main_process:
            log.info("memory: %s", memory.describe(held()))

        state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0}
        if resume is not None:
            state = checkpoint.load_checkpoint(acc, resume, moving_reference)
            log.info("resumed from %s at step %d", resume, state["global_step"])

        # Built in: the health checks see every logged record (training, eval_, step callbacks) and warn once each.
        self.health = HealthCallback.from_config(cfg) if cfg.health_checks else None
        metrics_log = open_metrics(cfg, acc, out, state["global_step"], resumed=resume is not None,
                                   callbacks=[*self.callbacks, *([self.health] if self.health else [])])
        if resume is not None and self.health is not None:  # the checks judge the whole run, not only this part
            self.health.replay(metrics_log.records())
        self._log_start(inputs, reference, total_steps, num_epochs, budget)
        for callback in self.callbacks:
            if hasattr(callback, "on_train_begin"):
                callback.on_train_begin(total_steps, acc.unwrap_model(policy).model)

        window = MetricWindow()
        result = RunResult(out, None, state["global_step"])
        bar = tqdm(total=total_steps, initial=state["global_step"], desc=f"{'+'.join(cfg.methods)}",
                   disable=not acc.is_local_main_process or cfg.disable_tqdm, dynamic_ncols=True)
        policy.train()
        started, pairs_seen, tokens_seen, last_log = time.perf_counter(), 0, 0, time.perf_counter()
        step = state["global_step"]
        window_rows: list[int] = []  # source rows of the micro-batches of the step being accumulated
        for epoch in range(state["epoch"], num_epochs):
            train_dl.set_epoch(epoch)
            if budget is not None:  # under several processes Accelerate's shard does not pass set_epoch on to it
                budget.set_epoch(epoch)
            skip = state["batches_in_epoch"] if epoch == state["epoch"] else 0
            batches = acc.skip_first_batches(train_dl, skip) if skip else train_dl
            if online is not None:  # fetch batch: sample each step's prompts from the current policy, judge, collate
                batches = online.batches(batches, acc.unwrap_model(policy).model, window, epoch)
            for batch_index, batch in enumerate(batches, start=skip):
                window_rows += batch["source_rows"].tolist() if "source_rows" in batch else []
                with acc.accumulate(policy):
                    try:
                        loss = batch_loss(policy, reference, batch, spec, window)
                    except NonFiniteLoss as err:
                        raise self._stopped(step + 1, epoch, window_rows, f"the loss is not finite ({err})") from None
                    acc.backward(loss)
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                        grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32).reshape(1)
                        if not cfg.fp16 and not bool(torch.isfinite(grad_norm).all()):  # fp16: the scaler skips
                            raise self._stopped(step + 1, epoch, window_rows,
                                                f"the gradient norm is {grad_norm.item()}")
                        window.add("grad_norm", grad_norm)
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
                window_rows = []
                bar.update(1)
                state = {"global_step": step, "epoch": epoch, "batches_in_epoch": batch_index + 1,
                         "run": fingerprint}
                if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
                    reference.sync(acc.unwrap_model(policy).model, cfg.ref_model_mixup_alpha)
                self._run_callbacks(step, acc.unwrap_model(policy).model, metrics_log)
                if self._stop_requested():
                    total_steps = step  # this step is the last: logged, then the end of a run (eval, final/)
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
                    shown = {"loss": f"{record.get('loss', math.nan):.4f}", f"{spec.unit}/s": f"{speed:.1f}"}
                    if "reward" in record:
                        shown["reward"] = f"{record['reward']:.3f}"
                    if "rewards/accuracies" in record:
                        shown["acc"] = f"{record['rewards/accuracies']:.2f}"
                    bar.set_postfix(shown | (self.health.postfix() if self.health is not None else {}))
                if inputs.eval is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
                    result.eval_metrics = self._evaluate(session, step, metrics_log)
                if self._stop_requested():  # asked in on_log or on_evaluate (transformers' EarlyStoppingCallback)
                    total_steps = step
                if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                    checkpoint.save_checkpoint(acc, out, step, state, cfg.save_total_limit, moving_reference)
                if step >= total_steps:
                    break
            if step >= total_steps:
                break
        bar.close()
        train_seconds = time.perf_counter() - started

        return self._finish(session, out, step, state, result, train_seconds, metrics_log, held(),
                            moving_reference=moving_reference)

    def _finish(self, session: Session, out: Path, step: int, state: dict, result: RunResult, train_seconds: float,
                metrics_log: MetricsLog, memory_held: dict, extra: dict | None = None,
                moving_reference: nn.Module | None = None) -> RunResult:
        """The end of a run, shared by the one loop and PPO's: the last evaluation (unless one just ran), the check
        for non-finite weights, the last checkpoint, ``final/`` with its model card in one atomic write, and
        ``summary.json`` (``extra``: the loop's own entries), the upload of ``final/`` (``push_to_hub``), then the
        callbacks' ``on_train_end``."""
        cfg, acc, inputs = self.cfg, self.accelerator, session.inputs
        if inputs.eval is not None and not (cfg.eval_steps and step % cfg.eval_steps == 0):
            result.eval_metrics = self._evaluate(session, step, metrics_log)
        check_finite_weights(acc.unwrap_model(session.policy), step)
        if cfg.save_steps:
            checkpoint.save_checkpoint(acc, out, step, {**state, "epoch": session.num_epochs, "batches_in_epoch": 0},
                                       cfg.save_total_limit, moving_reference)
        result.global_step = self.global_step = step
        summary = {"global_step": step, "train_runtime_s": round(train_seconds, 3),
                   "first_loss": result.first_loss, "train": result.train_metrics,
                   "eval": result.eval_metrics, "reference": session.reference.name, "methods": cfg.methods,
                   "parameters": inputs.parameter_counts, "data": inputs.data_reports,
                   "layout": inputs.collator.describe(), "processes": acc.num_processes, "memory": memory_held,
                   **({"online": online_summary(session.online)} if session.online is not None else {}),
                   **(extra or {}),
                   **({"health": self.health.summary()} if self.health is not None else {})}
        result.final_dir = checkpoint.export_final(acc, session.policy, inputs.tokenizer, out, cfg.save_merged_model,
                                                   config=effective_config(cfg), summary=summary)
        if acc.is_main_process:
            summary["final_dir"] = str(result.final_dir)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        acc.end_training()
        if cfg.push_to_hub and acc.is_main_process:  # a failure leaves final/ as it is, and says how to upload it
            hub.push_final(cfg, result.final_dir)
        self._train_end(result)
        return result

    def _train_end(self, result: RunResult) -> None:
        """The callbacks' ``on_train_end``, once the run is written."""
        for callback in self.callbacks:
            if hasattr(callback, "on_train_end"):
                callback.on_train_end(result)

    # ------------------------------------------------------------------------------------------------
    def _stopped(self, step: int, epoch: int, rows: list[int], what: str) -> TrainingError:
        """The report of a run stopped by a non-finite value: where, on which rows, and what to try."""
        shown = ", ".join(map(str, rows[:16])) + (", …" if len(rows) > 16 else "")
        where = f" on rows {shown} of {self.cfg.dataset or 'the training data'}" if rows else ""
        return TrainingError(f"training stopped at step {step} (epoch {epoch}): {what}{where}; nothing was exported "
                             f"(learning_rate is {self.cfg.learning_rate:g}: try a lower one, or check those rows)")

    def _stop_requested(self) -> bool:
        """Whether a callback set transformers' ``control.should_training_stop`` (training.hf_callbacks)."""
        return any(getattr(callback, "should_training_stop", False) for callback in self.callbacks)

    def _schedule_length(self, batches_per_epoch: int) -> tuple[int, int]:
        cfg = self.cfg
        per_epoch = max(1, math.ceil(batches_per_epoch / self.accelerator.num_processes
                                     / cfg.gradient_accumulation_steps))
        if cfg.max_steps > 0:
            return cfg.max_steps, math.ceil(cfg.max_steps / per_epoch)
        return math.ceil(per_epoch * cfg.num_train_epochs), math.ceil(cfg.num_train_epochs)

    def _run_callbacks(self, step: int, model: nn.Module, metrics_log: MetricsLog) -> None:
        """Step callbacks (generation, judges, …): the metrics they return go into metrics.jsonl."""
        for callback in self.callbacks:
            step_end = getattr(callback, "on_step_end", None) or (callback if callable(callback) else None)
            if step_end is None:
                continue
            was_training = model.training
            record = step_end(step, model)
            model.train(was_training)
            if record:
                metrics_log.write({"step": step, **record})

    def _eval_rows(self, dataset) -> Iterator[tuple[list[dict], bool]]:
        """Every evaluation row exactly once over all processes: process p takes rows p, p+P, p+2P, …, and every
        process runs the same number of batches (model forwards may synchronise processes); a process out of rows
        runs a stand-in batch flagged ``False``, whose metrics are not counted. So the metrics equal one process's
        for any batch size (Accelerate's even batches would count repeated rows instead)."""
        acc, size = self.accelerator, self.cfg.per_device_eval_batch_size
        mine = list(range(acc.process_index, len(dataset), acc.num_processes))
        rounds = math.ceil(math.ceil(len(dataset) / acc.num_processes) / size)
        for start in range(0, rounds * size, size):
            rows = mine[start : start + size]
            yield [dataset[i] for i in (rows or [0])], bool(rows)

    @torch.no_grad()
    def _evaluate(self, session: Session, step: int | None, metrics_log: MetricsLog | None) -> dict[str, float]:
        """The held-out loss and metrics; for online methods, one judged sample of each held-out prompt.
        Written to metrics.jsonl (and the trackers) during training; returned either way."""
        acc, policy, online = self.accelerator, session.policy, session.online
        started = time.perf_counter()
        was_training = policy.training
        policy.eval()
        window, ignored = MetricWindow(), MetricWindow()
        for rows, counted in self._eval_rows(session.inputs.eval):
            if online is not None:
                online.evaluate(rows, acc.unwrap_model(policy).model, window if counted else ignored, step or 0)
            else:
                batch = {k: v.to(acc.device) for k, v in session.inputs.collator(rows).items()}
                batch_loss(policy, session.reference, batch, session.spec, window if counted else ignored)
        policy.train(was_training)
        seconds = time.perf_counter() - started
        record = {"step": step, **{f"eval_{k}": v for k, v in window.values(acc).items()},
                  "eval_runtime": round(seconds, 4), "eval_samples_per_second": len(session.inputs.eval) / seconds}
        if metrics_log is not None:
            metrics_log.write(record)
        for callback in self.callbacks:
            if hasattr(callback, "on_evaluate"):
                callback.on_evaluate(record)
        return record

    def _online_source(self, inputs: RunInputs, spec: LossSpec) -> OnlineBatches:
        judge = self.judge
        if judge is None:
            judge = load_judge(self.cfg.judge, device=self.accelerator.device)
        elif not hasattr(judge, "score"):  # a plain function of (prompts, completions)
            judge = CallableJudge(judge)
        return OnlineBatches(self.cfg, spec.kind, inputs.tokenizer, inputs.collator, judge, self.accelerator)

    def _log_start(self, inputs: RunInputs, reference, total_steps: int, num_epochs: int,
                   budget: TokenBudgetBatchSampler | None) -> None:
        if not self.accelerator.is_main_process:
            return
        cfg = self.cfg
        trainable, total = inputs.parameter_counts
        log.info("methods %s | reference: %s | %d train rows, %s eval rows | %d steps over %d epoch(s) | "
                 "%d processes | trainable params %s of %s", "+".join(cfg.methods), reference.name,
                 len(inputs.train), len(inputs.eval) if inputs.eval is not None else 0, total_steps,
                 num_epochs, self.accelerator.num_processes, f"{trainable:,}", f"{total:,}")
        precision = "bf16 autocast" if cfg.bf16 else "fp16 autocast" if cfg.fp16 else "fp32"
        log.info("precision: %s (weights loaded as %s) | layout: %s | fused MLPs: %s", precision, cfg.dtype,
                 inputs.collator.describe(), "yes" if cfg.fused_mlp else "no")
        if budget is not None:
            log.info("batches: up to %d tokens each, %d per epoch; %d example(s) longer than that train alone",
                     budget.max_tokens, len(budget), budget.over_budget)
        else:
            log.info("batches: %d examples each%s", cfg.per_device_train_batch_size,
                     ", grouped by length" if cfg.group_by_length else "")
        for report in inputs.data_reports.values():
            log.info("%s", report)


def effective_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as the run computes with it: each loss hyper-parameter of the run's methods left at None holds
    the value used (the first method's registry default), so ``beta: null`` and ``beta: 0.1`` under DPO are the
    same run; hyper-parameters of methods the run does not use are left out."""
    values = cfg.to_dict()
    used = {k for m in cfg.methods for k in get_method(m).hparams}
    for unused in {k for m in METHODS.values() for k in m.hparams} - used:
        values.pop(unused, None)
    for name in cfg.methods:
        for key, default in get_method(name).defaults.items():
            if values.get(key) is None:
                values[key] = default
    return values


def check_finite_weights(model: nn.Module, step: int) -> None:
    """Never export non-finite weights: a model that holds any is refused with the names of its first tensors."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(f"after step {step} {len(bad)} weight tensors hold non-finite values ({', '.join(bad[:3])}"
                            f"{', …' if len(bad) > 3 else ''}); nothing was exported: lower the learning_rate")


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """Trackers accept scalars and strings only."""
    flat = {}
    for key, value in cfg.to_dict().items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def open_metrics(cfg: TrainConfig, acc: Accelerator, out: Path, step: int, resumed: bool,
                 callbacks: list = ()) -> MetricsLog:
    """``metrics.jsonl`` (a resumed run drops the records its interrupted run logged after ``step``; callbacks with
    ``on_log`` hear every record) and the trackers."""
    metrics_log = MetricsLog(out / "metrics.jsonl", acc, listeners=[c for c in callbacks if hasattr(c, "on_log")])
    if resumed:
        dropped = metrics_log.resume_at(step)
        if dropped:
            log.info("metrics.jsonl: dropped %d records logged after step %d by the interrupted run", dropped, step)
    if acc.is_main_process:
        run_name = cfg.run_name or out.name
        # purge_step: TensorBoard hides the interrupted run's events after the checkpoint's step.
        purge = {"purge_step": step + 1} if resumed else {}
        acc.init_trackers("preftune", config=_tracker_config(cfg),
                          init_kwargs={"wandb": {"name": run_name}, "mlflow": {"run_name": run_name},
                                       "tensorboard": purge})
    return metrics_log


def train(config: TrainConfig | dict | str | Path, **objects) -> RunResult:
    """Train from a config object, a mapping of config keys, or a YAML path; see :class:`PreferenceTrainer`."""
    from preftune.config import build_config, load_config

    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = build_config(config)
    return PreferenceTrainer(config, **objects).train()
