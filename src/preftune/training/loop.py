"""The run driver, on Accelerate: what every method shares, around the algorithm that makes it different.

fetch an update's work → the algorithm's update (its losses, the driver's optimizer step) → schedule → callbacks,
log, evaluate, checkpoint → the end of a run (last evaluation, finite check, ``final/`` with its card,
``summary.json``, ``push_to_hub``). The algorithms (:mod:`preftune.training.algorithm`): offline pairs
(:mod:`~preftune.training.offline`), online rollouts (:mod:`~preftune.training.online`), PPO
(:mod:`~preftune.training.ppo`); runs in rounds (RSO, SPPO, iterative DPO) compose runs of this driver
(:mod:`~preftune.training.rounds`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from preftune import metric_names as names
from preftune.config import Resolved, TrainConfig
from preftune.errors import ConfigError, TrainingError
from preftune.methods.registry import get_method
from preftune.modeling.modes import eval_mode
from preftune.training import checkpoint, hub, memory, rounds
from preftune.training.algorithm import Algorithm, Session, Update
from preftune.training.fsdp import fsdp_on_cpu
from preftune.training.health import HealthCallback
from preftune.training.hf_callbacks import adapt_callbacks
from preftune.training.objective import NonFiniteLoss
from preftune.training.offline import Offline
from preftune.training.online import Online
from preftune.training.optim import build_optimizer, make_scheduler
from preftune.training.ppo import PPO
from preftune.training.rundir import RunResult, effective_config, on_main_process, open_run_folder
from preftune.training.setup import prepare_inputs, settle_judge, uses_embedded_model
from preftune.training.tracking import MetricsLog, MetricWindow, obeys_disable_tqdm

log = logging.getLogger("preftune")

# The algorithm of each registry entry's ``algorithm`` ("online" and "offline" when it names none).
ALGORITHMS: dict[str, Callable[..., Algorithm]] = {"offline": Offline, "online": Online, "ppo": PPO}

# Called after every optimizer step with (step, the unwrapped model); may return metrics to log.
StepCallback = Callable[[int, nn.Module], "dict[str, float] | None"]

# What the progress bar shows of a logged record: (name, label, decimals).
_SHOWN = ((names.LOSS, "loss", 4), (names.REWARD, "reward", 3), (names.REWARDS_ACCURACIES, "acc", 2),
          (names.OBJECTIVE_SCORES, "score", 3), (names.OBJECTIVE_KL, "kl", 2))


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


def resolve_precision(cfg: TrainConfig, embedded_model: bool) -> bool:
    """Whether the run trains under bf16 autocast: ``bf16`` as given, or, left at None (the default), where bf16 is
    native (and fp16 is not asked for), as in TRL: bf16 autocast was ×1.5–1.6 faster than fp32 per pair for a
    58M-parameter model on a 2-core AVX512-BF16 CPU (benchmarks/README.md). The embedded toy model stays fp32: its
    matmuls are too small for autocast's casts to pay (×0.7). Recorded as :attr:`Resolved.bf16`."""
    if cfg.bf16 is not None:
        return cfg.bf16
    return not cfg.fp16 and cfg.dtype != "float16" and not embedded_model and native_bf16()


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


def make_accelerator(cfg: TrainConfig, bf16: bool) -> Accelerator:
    precision = "bf16" if bf16 else "fp16" if cfg.fp16 else "no"
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
    if cfg.optimizer_in_backward and accelerator.num_processes > 1:
        raise ConfigError(f"optimizer_in_backward steps each parameter inside backward, before DDP, FSDP or DeepSpeed "
                          f"has reduced its gradient over the {accelerator.num_processes} processes: run it on one "
                          "process, or turn it off")
    return accelerator


class PreferenceTrainer:
    """Train a causal LM with any registered method.

    Everything is optional but the config: pass an in-memory ``model`` / ``ref_model`` / ``tokenizer`` /
    ``train_dataset`` / ``eval_dataset`` (a ``datasets.Dataset``, a ``DatasetDict`` or a list of rows in any accepted
    format), or let the config name them, or leave both empty for the embedded default. ``judge`` scores online
    methods' samples (a Judge, or a function of (prompts, completions)); ``callbacks`` are functions called after
    every optimizer step with ``(step, model)`` (their returned metrics are logged) or objects with any of
    ``on_train_begin(max_steps, model)``, ``on_step_end(step, model)``, ``on_log(record)``, ``on_evaluate(record)``
    and ``on_train_end(result)``; a ``transformers.TrainerCallback`` is called with the ``args, state, control`` it
    expects (training.hf_callbacks). Built in (``health_checks: true``):
    :class:`preftune.training.health.HealthCallback`, which reads every logged record and warns once per failing
    health check (log, progress bar, ``summary.json``'s ``health``).

    ``train()`` runs the driver; ``evaluate()`` gives the held-out metrics now (before, during or after training);
    ``save_model(path)`` writes the policy in Hugging Face format with its tokenizer; ``model`` is the policy;
    ``algorithm`` is what the method's registry entry names (:data:`ALGORITHMS`).
    """

    def __init__(self, config: TrainConfig, model=None, ref_model=None, tokenizer=None,
                 train_dataset=None, eval_dataset=None, callbacks: list = (), judge=None):
        self.cfg = copy.deepcopy(config).validate()  # validate() normalises in place: not the caller's object
        self.judge = judge  # a Judge, a pairwise judge or a function (prompts, completions) -> scores; else cfg.judge
        # The choices the config leaves to the run: precision and judge now, the model's layout once it is loaded.
        self.resolved = Resolved(bf16=resolve_precision(self.cfg, embedded_model=uses_embedded_model(self.cfg, model)),
                                 judge=settle_judge(self.cfg, judge, model, train_dataset) if self.cfg.is_online
                                 else self.cfg.judge)  # a run of rounds settles its judge when it starts
        self.accelerator = make_accelerator(self.cfg, self.resolved.bf16)
        self.given = dict(model=model, ref_model=ref_model, tokenizer=tokenizer,
                          train_dataset=train_dataset, eval_dataset=eval_dataset)
        self.callbacks = adapt_callbacks(list(callbacks), self.resolved.applied(self.cfg),
                                         self.accelerator.is_main_process)
        # A method trained in rounds runs the offline algorithm once per round, on that round's pairs.
        self.algorithm: Algorithm = ALGORITHMS[algorithm_name(self.cfg)](self.cfg, self.judge, self.resolved)
        self.session: Session | None = None
        self.health: HealthCallback | None = None  # the built-in health checks of the current or last train()
        self.global_step = 0  # updates the policy has taken in this trainer: evaluate()'s step
        self._where = (0, 0)  # (step, epoch) of the update under way, for the error that stops a run

    @property
    def model(self) -> nn.Module | None:
        """The policy (a Hugging Face model, or a PEFT model under LoRA); None before any data or model is loaded.
        A method trained in rounds has one model per round, on disk: asking for the one policy is a ConfigError
        that says where they are (rather than the initial model it was given)."""
        self._not_rounds("trainer.model")
        return self.given["model"] if self.session is None else self.session.model

    def _prepare(self) -> Session:
        """Data, the algorithm's model and loader, optimizer, schedule, reference: once, on first use."""
        if self.session is not None:
            return self.session
        cfg, acc = self.cfg, self.accelerator
        set_seed(cfg.seed)
        inputs = prepare_inputs(cfg, acc, self.resolved, **self.given)
        self.resolved = inputs.resolved  # with the model's layout and the reference's plan
        parts = self.algorithm.prepare(inputs, acc)
        optimizer = build_optimizer(cfg, parts.model)
        # Each process's share of the loader, as Accelerate shards it (whole batches: a last short one is kept unless
        # the loader drops it), so that the schedule is built before and prepared with the rest (DeepSpeed needs that).
        batches = len(parts.loader)
        per_process = batches // acc.num_processes if parts.loader.drop_last else math.ceil(batches / acc.num_processes)
        total_steps, num_epochs = self._schedule_length(self.algorithm.updates_per_epoch(per_process))
        # The schedule steps once per update (for PPO an update is a rollout and all its optimizer steps, as in TRL).
        scheduler = make_scheduler(cfg, optimizer, total_steps, acc.num_processes)
        policy, optimizer, loader, scheduler = acc.prepare(parts.model, optimizer, parts.loader, scheduler)
        self.session = Session(inputs, policy, optimizer, scheduler, loader, inputs.make_reference(policy, acc),
                               total_steps, num_epochs, acc)
        self.algorithm.start(self.session)
        return self.session

    # ------------------------------------------------------------------------------------------------
    @obeys_disable_tqdm
    def train(self) -> RunResult:
        """One run of the driver; a method trained in rounds (RSO, SPPO, iterative DPO) runs its rounds above the
        driver, one run of it per round (:mod:`preftune.training.rounds`). With ``push_to_hub``, what would stop the
        upload at the end (offline mode, no token, no network) stops the run now, before anything is loaded."""
        on_main_process(self.accelerator, lambda: hub.check_push(self.cfg))
        if self.cfg.rounds is not None:
            return rounds.train_rounds(self)
        return self.train_once()

    def train_once(self) -> RunResult:
        """One run of the driver in ``output_dir``, whatever the method."""
        out, resume, lock = open_run_folder(self.cfg, self.accelerator)
        try:
            return self._train(out, resume)
        finally:
            if lock is not None:
                lock.release()

    def _not_rounds(self, what: str) -> None:
        # A run of rounds holds one model per round, not one session: its records say what each round did.
        if self.cfg.rounds is not None and self.session is None:
            raise ConfigError(f"{what} works on one run of the driver; {self.cfg.methods[0]} trains in rounds: each "
                              "round's held-out evaluation is in output_dir/rounds.json (set eval_split_size or "
                              "eval_dataset), its model in output_dir/round-k/final, the last one in output_dir/final")

    @obeys_disable_tqdm
    def evaluate(self) -> dict[str, float]:
        """The held-out metrics of the policy as it is now (``eval_``-prefixed, with ``eval_runtime``, and ``step``:
        the updates it has taken here, 0 before ``train()``); needs an evaluation set (``eval_dataset``, or
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

    # ---- the driver ----------------------------------------------------------------------------------
    def _train(self, out: Path, resume: Path | None) -> RunResult:
        """The loop: each update's work from the algorithm, its update, the schedule, then what follows a step."""
        session, algorithm = self._prepare(), self.algorithm
        state, metrics_log, fingerprint = self._begin(session, out, resume)
        window, result = MetricWindow(), RunResult(out, None, state["global_step"])
        self._progress = _Progress(tqdm(total=session.total_steps, initial=state["global_step"],
                                        desc="+".join(self.cfg.methods), dynamic_ncols=True,
                                        disable=not self.accelerator.is_local_main_process or self.cfg.disable_tqdm))
        session.policy.train()
        step, started, epoch, last = state["global_step"], time.perf_counter(), state["epoch"], False
        optimizer_step = functools.partial(self._optimizer_step, window)
        # Epochs until the run's length: under max_steps past the estimate too (dynamic sampling draws more prompts
        # per update than updates_per_epoch counts), while an epoch still gives work.
        while not last and step < session.total_steps and (epoch < session.num_epochs or self.cfg.max_steps > 0):
            skip, before = state["batches_in_epoch"] if epoch == state["epoch"] else 0, step
            for work in algorithm.work(epoch, skip, window):
                work.step, self._where = step + 1, (step + 1, epoch)
                update = algorithm.update(work, optimizer_step, window)
                session.scheduler.step()
                step += 1
                state = {"global_step": step, "epoch": epoch, "batches_in_epoch": work.consumed, "run": fingerprint,
                         **algorithm.state()}
                last = self._after_update(session, update, state, epoch + work.progress / len(session.loader),
                                          window, result, metrics_log)  # the run's length, or a callback's stop
                if last:
                    break
            if step == before:
                break
            epoch += 1
        self._progress.bar.close()
        return self._finish(session, out, step, state, result, time.perf_counter() - started, metrics_log)

    def _begin(self, session: Session, out: Path, resume: Path | None) -> tuple[dict, MetricsLog, dict]:
        """The run's fingerprint (checked against a resumed checkpoint's), config.yaml, the resumed state, the metrics
        log with its listeners (the built-in health checks replay a resumed run's records), the start of the log."""
        cfg, acc = self.resolved.applied(self.cfg), self.accelerator  # the config as the run computes with it
        fingerprint = checkpoint.run_fingerprint(effective_config(cfg), session.inputs.data_fingerprints)
        state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0}
        if resume is not None:
            checkpoint.check_same_run(resume, checkpoint.read_state(resume), fingerprint)
            state = checkpoint.load_checkpoint(acc, resume, self._moving_reference())
            self.algorithm.load_state(state)
            log.info("resumed from %s at step %d", resume, state["global_step"])
        elif acc.is_main_process:  # a resumed run keeps the config.yaml it started with
            cfg.save(out / "config.yaml")
        self.health = HealthCallback.from_config(cfg) if cfg.health_checks else None
        metrics_log = open_metrics(cfg, acc, out, state["global_step"], resumed=resume is not None,
                                   callbacks=[*self.callbacks, *([self.health] if self.health else [])])
        if resume is not None and self.health is not None:  # the checks judge the whole run, not only this part
            self.health.replay(metrics_log.records())
        self._log_start(session)
        for callback in self.callbacks:
            if hasattr(callback, "on_train_begin"):
                callback.on_train_begin(session.total_steps, session.model)
        return state, metrics_log, fingerprint

    def _optimizer_step(self, window: MetricWindow, micro_batches: Sequence[Any], loss_of: Callable[[Any], Tensor],
                        rows: list[int]) -> float:
        """One optimizer step over ``micro_batches``: each one's loss to backward (Accelerate divides it by
        ``gradient_accumulation_steps``; DDP all-reduces on the last one only), the gradient clipped to
        ``max_grad_norm`` and checked finite, the step (under ``optimizer_in_backward`` backward took it already,
        unclipped, and only the norm is left to check). Returns the first micro-batch's loss."""
        acc, policy, optimizer = self.accelerator, self.session.policy, self.session.optimizer
        first = None
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # What Accelerate's accumulate() sets: DeepSpeed's engine reads it as the accumulation boundary.
            acc.gradient_state._set_sync_gradients(last)
            with contextlib.nullcontext() if last else acc.no_sync(policy):
                try:
                    loss = loss_of(batch)
                except NonFiniteLoss as err:
                    acc.gradient_state._set_sync_gradients(True)
                    raise self._stopped(rows, f"the loss is not finite ({err})") from None
                acc.backward(loss)
            first = loss.item() if first is None else first
        if self.cfg.optimizer_in_backward:  # each parameter has stepped in backward; unclipped (OptimizerInBackward)
            grad_norm = optimizer.optimizer.take_grad_norm()
        else:
            grad_norm = torch.as_tensor(acc.clip_grad_norm_(policy.parameters(), self.cfg.max_grad_norm),
                                        dtype=torch.float32).reshape(1)
        if not self.cfg.fp16 and not bool(torch.isfinite(grad_norm).all()):  # fp16: the scaler skips the step
            raise self._stopped(rows, f"the gradient norm is {grad_norm.item()}")
        window.add(names.GRAD_NORM, grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        return first

    def _after_update(self, session: Session, update: Update, state: dict, epoch: float, window: MetricWindow,
                      result: RunResult, metrics_log: MetricsLog) -> bool:
        """What follows every update: the algorithm's own step end (TR-DPO's reference sync), callbacks, the log,
        evaluation and checkpoint cadences. Returns whether the run ends here (its last step, or a callback asked)."""
        cfg, step, progress = self.cfg, state["global_step"], self._progress
        if result.first_loss is None:
            result.first_loss = update.first_loss
        progress.count(update)
        if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
            # TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656): π_ref ← α·π + (1−α)·π_ref, for any method
            session.reference.sync(session.model, cfg.ref_model_mixup_alpha)
        self._run_callbacks(step, session.model, metrics_log)
        last = step >= session.total_steps or self._stop_requested()
        if step % cfg.logging_steps == 0 or last:
            record = {names.STEP: step, "epoch": round(epoch, 4), "learning_rate": session.scheduler.get_last_lr()[0],
                      **update.record, **window.values(self.accelerator), **progress.rates(self.algorithm.unit,
                                                                                           self.accelerator)}
            metrics_log.write(record)
            result.train_metrics = record
            progress.show(record, self.health)
        if session.inputs.eval is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
            result.eval_metrics = self._evaluate(session, step, metrics_log)
        last = last or self._stop_requested()  # asked in on_log or on_evaluate (transformers' EarlyStoppingCallback)
        if cfg.save_steps and step % cfg.save_steps == 0 and not last:
            checkpoint.save_checkpoint(self.accelerator, Path(result.output_dir), step, state, cfg.save_total_limit,
                                       self._moving_reference())
        return last  # then the end of a run (eval, final/)

    def _finish(self, session: Session, out: Path, step: int, state: dict, result: RunResult, train_seconds: float,
                metrics_log: MetricsLog) -> RunResult:
        """The end of a run: the last evaluation (unless one just ran), the check for non-finite weights, the last
        checkpoint, ``final/`` with its model card in one atomic write, ``summary.json``, the upload of ``final/``
        (``push_to_hub``), then the callbacks' ``on_train_end``."""
        cfg, acc, inputs = self.cfg, self.accelerator, session.inputs
        if inputs.eval is not None and not (cfg.eval_steps and step % cfg.eval_steps == 0):
            result.eval_metrics = self._evaluate(session, step, metrics_log)
        check_finite_weights(acc.unwrap_model(session.policy), step)
        if cfg.save_steps:
            checkpoint.save_checkpoint(acc, out, step, {**state, "epoch": session.num_epochs, "batches_in_epoch": 0},
                                       cfg.save_total_limit, self._moving_reference())
        result.global_step = self.global_step = step
        summary = {"global_step": step, "train_runtime_s": round(train_seconds, 3),
                   "first_loss": result.first_loss, "train": result.train_metrics,
                   "eval": result.eval_metrics, "reference": session.reference.name, "methods": cfg.methods,
                   "parameters": inputs.parameter_counts, "data": inputs.data_reports,
                   "layout": inputs.collator.describe(), "processes": acc.num_processes,
                   "memory": self.algorithm.memory(), **self.algorithm.summary(),
                   **({"health": self.health.summary()} if self.health is not None else {})}
        result.final_dir = checkpoint.export_final(acc, session.policy, inputs.tokenizer, out, cfg.save_merged_model,
                                                   config=effective_config(self.resolved.applied(cfg)),
                                                   summary=summary)
        if acc.is_main_process:
            summary["final_dir"] = str(result.final_dir)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        acc.end_training()
        if cfg.push_to_hub and acc.is_main_process:  # a failure leaves final/ as it is, and says how to upload it
            hub.push_final(cfg, result.final_dir)
        for callback in self.callbacks:
            if hasattr(callback, "on_train_end"):
                callback.on_train_end(result)
        return result

    # ------------------------------------------------------------------------------------------------
    def _moving_reference(self) -> nn.Module | None:
        """TR-DPO's reference moves with the policy: its weights are part of a checkpoint."""
        return self.session.reference.module if self.cfg.sync_ref_model else None

    def _stopped(self, rows: list[int], what: str) -> TrainingError:
        """The report of a run stopped by a non-finite value: where, on which rows, and what to try."""
        step, epoch = self._where
        shown = ", ".join(map(str, rows[:16])) + (", …" if len(rows) > 16 else "")
        where = f" on rows {shown} of {self.cfg.dataset or 'the training data'}" if rows else ""
        return TrainingError(f"training stopped at step {step} (epoch {epoch}): {what}{where}; nothing was exported "
                             f"(learning_rate is {self.cfg.learning_rate:g}: try a lower one, or check those rows)")

    def _stop_requested(self) -> bool:
        """Whether a callback set transformers' ``control.should_training_stop`` (training.hf_callbacks)."""
        return any(getattr(callback, "should_training_stop", False) for callback in self.callbacks)

    def _schedule_length(self, updates_per_epoch: int) -> tuple[int, int]:
        """Updates and epochs of the run: ``max_steps``, else ``num_train_epochs`` of the prepared loader."""
        cfg, per_epoch = self.cfg, max(1, updates_per_epoch)
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
                metrics_log.write({names.STEP: step, **record})

    def _eval_rows(self, dataset) -> Iterator[tuple[list[dict], bool]]:
        """Every evaluation row exactly once over all processes: process p takes rows p, p+P, p+2P, …, and every
        process runs the same number of batches (model forwards may synchronise processes); a process out of rows
        runs a stand-in batch flagged ``False``, whose metrics are not counted. So the metrics equal one process's
        for any batch size (Accelerate's even batches would count repeated rows instead)."""
        acc, size = self.accelerator, self.cfg.per_device_eval_batch_size
        mine = list(range(acc.process_index, len(dataset), acc.num_processes))
        rounds_ = math.ceil(math.ceil(len(dataset) / acc.num_processes) / size)
        for start in range(0, rounds_ * size, size):
            rows = mine[start : start + size]
            yield [dataset[i] for i in (rows or [0])], bool(rows)

    @torch.no_grad()
    def _evaluate(self, session: Session, step: int | None, metrics_log: MetricsLog | None) -> dict[str, float]:
        """The held-out metrics (the algorithm's: the loss and rewards of held-out pairs, or one judged sample of each
        held-out prompt). Written to metrics.jsonl (and the trackers) during training; returned either way."""
        started = time.perf_counter()
        window, ignored = MetricWindow(), MetricWindow()
        with eval_mode(session.policy):
            for rows, counted in self._eval_rows(session.inputs.eval):
                self.algorithm.evaluate(rows, window if counted else ignored, step or 0)
        seconds = time.perf_counter() - started
        held_out = {f"{names.EVAL_PREFIX}{k}": v for k, v in window.values(self.accelerator).items()}
        record = {names.STEP: step, **held_out, "eval_runtime": round(seconds, 4),
                  "eval_samples_per_second": len(session.inputs.eval) / seconds}
        if metrics_log is not None:
            metrics_log.write(record)
        for callback in self.callbacks:
            if hasattr(callback, "on_evaluate"):
                callback.on_evaluate(record)
        return record

    def _log_start(self, session: Session) -> None:
        if not self.accelerator.is_main_process:
            return
        cfg, inputs = self.cfg, session.inputs
        trainable, total = inputs.parameter_counts
        log.info("methods %s | reference: %s | %d train rows, %s eval rows | %d steps over %d epoch(s) | "
                 "%d processes | trainable params %s of %s", "+".join(cfg.methods), session.reference.name,
                 len(inputs.train), len(inputs.eval) if inputs.eval is not None else 0, session.total_steps,
                 session.num_epochs, self.accelerator.num_processes, f"{trainable:,}", f"{total:,}")
        precision = "bf16 autocast" if self.resolved.bf16 else "fp16 autocast" if cfg.fp16 else "fp32"
        log.info("precision: %s (weights loaded as %s) | layout: %s | fused MLPs: %s", precision, cfg.dtype,
                 inputs.collator.describe(), "yes" if self.resolved.fused_mlp else "no")
        for line in self.algorithm.describe():
            log.info("%s", line)
        log.info("memory: %s", memory.describe(self.algorithm.memory()))
        for report in inputs.data_reports.values():
            log.info("%s", report)


class _Progress:
    """The progress bar, and the examples and tokens trained on since the last log (throughput)."""

    def __init__(self, bar):
        self.bar, self.examples, self.tokens, self.since = bar, 0, 0, time.perf_counter()

    def count(self, update: Update) -> None:
        self.examples += update.examples
        self.tokens += update.tokens
        self.bar.update(1)

    def rates(self, unit: str, acc: Accelerator) -> dict[str, float]:
        now = time.perf_counter()
        seconds, self.since = now - self.since, now
        rates = {f"{unit}_per_second": self.examples * acc.num_processes / seconds,
                 "tokens_per_second": self.tokens * acc.num_processes / seconds}
        self.examples = self.tokens = 0
        return rates

    def show(self, record: dict, health: HealthCallback | None) -> None:
        shown = {label: f"{record[name]:.{digits}f}" for name, label, digits in _SHOWN if name in record}
        self.bar.set_postfix(shown | (health.postfix() if health is not None else {}))


def algorithm_name(cfg: TrainConfig) -> str:
    """The registry's ``algorithm`` of the run's first method, else "online" or "offline"."""
    return get_method(cfg.methods[0]).algorithm or ("online" if cfg.is_online else "offline")


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
