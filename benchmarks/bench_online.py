"""Online training benchmark: preftune's GRPO and Online DPO against TRL 1.16's ``GRPOTrainer`` and experimental
``OnlineDPOTrainer`` on the same model, prompts, reward function, group size, completion length and batch.

Usage (from the repository root, with the ``bench`` extra installed: ``trl==1.16.0``)::

    .venv/bin/python benchmarks/bench_online.py                 # 3 repeats × {grpo, online_dpo} × {preftune, trl}
    .venv/bin/python benchmarks/bench_online.py --shape small    # short sequences, 8k vocabulary, groups of 4
    .venv/bin/python benchmarks/bench_online.py --repeats 1 --steps 2   # smoke test
    .venv/bin/python benchmarks/bench_online.py --matrix         # the model-shape matrix (MATRIX), worst ratio first
    .venv/bin/python benchmarks/bench_online.py --layers 8 --hidden-size 512 --vocab-size 24000 --group-size 4

The workload's shape (vocabulary, prompt and completion lengths, group size) is one of :data:`SHAPES`, each
overridable; the model's depth and width are options too (``--layers``, ``--hidden-size``, ``--intermediate-size``,
``--heads``, ``--kv-heads``; by default 4 × 256). ``--matrix`` runs :data:`MATRIX` instead — from a model whose LM
head and embeddings outweigh its body to one whose body is 4.6× them — and heads the report with the worst
preftune/TRL ratio over every (shape, method).

Each run is a fresh process (so its peak memory is its own), the two tools alternate within a repeat and swap their
order from one repeat to the next (machine drift hits both). Inputs are built locally and deterministically into
``--work-dir``: a byte-level BPE tokenizer trained on generated pseudo-word prose, a randomly initialised
Llama-style model (``dpo_assets.ensure_model``) saved with its tokenizer, and prompt-only rows. Nothing is
downloaded.

Both tools: fp32 (no autocast) unless ``--bf16``, no gradient checkpointing, AdamW lr 1e-6, grad-norm clip 1.0,
seed 42, dropout off, SDPA attention, sampling at temperature 1 with top-k and top-p off, the same Python reward
function (:func:`reward`: a deterministic function of the completion text).

* GRPO: ``prompts_per_step`` prompts × ``group_size`` completions per optimizer step, one pass per generation
  (TRL: ``num_iterations=1``, ``steps_per_generation=1``), β = 0 (no reference model), ε = 0.2, group-scaled
  advantages, the ``dapo`` token averaging (both tools' defaults).
* Online DPO: ``prompts_per_step`` prompts × 2 completions, the sigmoid DPO loss with β = 0.1 against the initial
  model as a fixed reference.

Measured per run, after ``--warmup`` optimizer steps:

* **step time** — the interval between the ends of consecutive optimizer steps (sampling, judging, the training
  forward/backward and the optimizer step inside), read by a step-end callback in each tool;
  completions/s = completions per step / median step time;
* **generation time** — the time inside the sampler in that interval: preftune's own accounting
  (``Sampler.seconds['generation']``, around :func:`preftune.rollout.sampling.generate`), for TRL a timer
  around the policy's ``generate``; "training" = step − generation (judging, the loss, backward, optimizer);
* **generated tokens** per step (each completion up to and including its first EOS), to check that the two tools
  did the same amount of sampling;
* **peak memory** — on CPU the peak RSS of the run's process up to the end of its timed steps (``VmHWM``: imports,
  loading, training), the *training rise*: that ``VmHWM`` − ``VmRSS`` just before training (the memory training
  adds on top of the loaded model), and the *tensor peak* (:class:`TensorPeak`: live tensors plus the peak of torch's
  allocations over one more step run under the profiler, not timed — the CPU counterpart of a GPU's
  ``max_memory_allocated``); on CUDA ``torch.cuda.max_memory_allocated`` over the training, reset before it;
* **preftune's phases** — where its step goes, measured from outside its source (:class:`PhaseClock`): generation
  and judging (the sampler's own ``seconds``), the reference's forward, the policy's forward (the loss), backward
  with the loss and clipping, the optimizer step, and the rest (collation, copies, schedule, log).

Per configuration the report gives the median over repeats of each run's median step, and the preftune/TRL ratios.
Results: ``--results-dir/online-<UTC timestamp>.json`` (everything) and ``.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from dpo_assets import ModelShape, add_shape_arguments
from machine import cpu_flags, cpu_model, describe_cpu

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Llama-style, small enough that 12 runs fit in minutes on 2 CPU cores: 4 layers × 256 (4 heads, 2 KV heads, MLP 768).
DEFAULT_LAYERS, DEFAULT_HIDDEN, MAX_POSITIONS = 4, 256, 1024
# Workload shapes. "typical": a 32k vocabulary (Llama 2, Mistral; Qwen's is 152k), 128-token prompts (a chat or
# math prompt with its template), 64-token completions and TRL's default group of 8. "small": the first shape this
# benchmark ran (8k vocabulary, 32-token prompts and completions, groups of 4), where fixed per-step costs weigh most.
SHAPES: dict[str, dict[str, int]] = {
    "typical": dict(vocab_size=32_000, prompt_tokens=128, completion_tokens=64, group_size=8),
    "small": dict(vocab_size=8_000, prompt_tokens=32, completion_tokens=32, group_size=4),
}
TOOLS = ("preftune", "trl")
METHODS = ("grpo", "online_dpo")


@dataclass(frozen=True)
class Cell:
    """One point of the benchmark: the model's shape, the workload (prompt and completion lengths, GRPO's group
    size), and the timed steps and repeats of each (method, tool)."""

    model: ModelShape
    prompt_tokens: int
    completion_tokens: int
    group_size: int
    steps: int = 3
    repeats: int = 3

    @property
    def name(self) -> str:
        return f"{self.model.name}-p{self.prompt_tokens}-c{self.completion_tokens}-g{self.group_size}"


# --matrix: the shape of every earlier run (typical workload; body 0.19× its LM head + embeddings), 8 × 512 with a
# 24k vocabulary (1.0×) and 16 × 768 with a 16k vocabulary (4.6×; a 7B Llama's body is ≈25× its head + embeddings,
# and 16 × 768 with a 32k vocabulary would be only 2.3×). One repeat where a step takes longest.
MATRIX = (
    Cell(ModelShape(4, 256, 32_000, max_positions=MAX_POSITIONS), 128, 64, group_size=8, steps=3, repeats=2),
    Cell(ModelShape(8, 512, 24_000, max_positions=MAX_POSITIONS), 96, 48, group_size=4, steps=3, repeats=2),
    Cell(ModelShape(16, 768, 16_000, max_positions=MAX_POSITIONS), 96, 48, group_size=4, steps=3, repeats=1),
)


def reward(prompts, completions, **kwargs) -> list[float]:
    """The judge of both tools: distinct-word ratio of the completion plus a small length term (deterministic)."""
    scores = []
    for text in completions:
        words = text.split()
        scores.append(len(set(words)) / (1 + len(words)) + 0.01 * min(len(words), 50))
    return scores


# --------------------------------------------------------------------------------------------- inputs


def build_assets(work: Path, cell: Cell, n_prompts: int) -> dict:
    """Tokenizer + model folder and prompt rows (deterministic); checks that both tools encode the same prompt ids."""
    import random

    from dpo_assets import _Lexicon, ensure_model
    from transformers import AutoTokenizer

    from preftune.rollout.encoding import encode_prompts

    assets = ensure_model(work, cell.model)
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    lexicon = _Lexicon(0, size=20_000)
    rng = random.Random(2)
    prompts = []
    for _ in range(n_prompts):  # about prompt_tokens tokens each (BOS included), cut on a word boundary
        words = lexicon.sentences(rng, cell.prompt_tokens).split()
        while len(tokenizer(" ".join(words))["input_ids"]) > cell.prompt_tokens:
            words.pop()
        prompts.append(" ".join(words))
    # Same prompt ids on both sides: preftune's encoder, TRL GRPO's tokenizer(text), and TRL Online DPO's
    # tokenizer(text, add_special_tokens=False) on the BOS-prefixed text it is given.
    ours = encode_prompts(tokenizer, prompts, "benchmark prompts")
    grpo = tokenizer(prompts)["input_ids"]
    odpo = tokenizer([tokenizer.bos_token + p for p in prompts], add_special_tokens=False)["input_ids"]
    if not (ours == grpo == odpo):
        raise RuntimeError("preftune and TRL would encode the benchmark prompts differently")
    return {"model_dir": str(assets.model_dir), "prompts": prompts, "parameters": assets.parameters,
            "parameter_split": assets.split, "prompt_tokens_mean": statistics.mean(map(len, ours)),
            "vocab_size": len(tokenizer)}


# --------------------------------------------------------------------------------------------- one run (child)


def _proc_status(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (0 where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _stop_ids(model, tokenizer) -> set[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return {int(i) for i in [tokenizer.eos_token_id, *configured] if i is not None}


def _generated_tokens(rows, stops: set[int]) -> int:
    """Tokens of each row up to and including its first stop id."""
    total = 0
    for ids in rows.tolist():
        total += next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
    return total


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor the garbage collector can see, each storage counted once."""
    import gc

    import torch

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class TensorPeak:
    """On CPU, what ``torch.cuda.max_memory_allocated`` measures on a GPU, over one optimizer step: the bytes of live
    tensors at the step's start plus the peak of torch's CPU allocations during it, from the profiler's memory
    events (their ``Total Allocated`` counts the blocks allocated since profiling began). A block allocated before
    the step and freed during it is not subtracted, so this is an upper bound. Libraries, the interpreter and the
    heap's free space are not in it: it compares what each tool keeps in tensors."""

    def __init__(self):
        self.profiler, self.at_start, self.peak = None, 0, None

    def start(self) -> None:
        import torch

        self.at_start = live_tensor_bytes()
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.profiler.start()

    def stop(self) -> None:
        self.profiler.stop()
        with tempfile.TemporaryDirectory() as folder:
            trace = Path(folder) / "trace.json"
            self.profiler.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        totals = [e["args"]["Total Allocated"] for e in events
                  if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
        self.peak = self.at_start + max(totals, default=0)
        self.profiler = None


class PhaseClock:
    """Where a preftune online step's time goes, measured from outside its source: a wrapper on the algorithm's
    ``update`` (the step's loss passes and optimizer step) and on the reference's ``outputs``, forward hooks on the
    policy, torch's global optimizer-step hooks; the sampler's own ``seconds`` give generation and judging.

    Seconds are cumulative; :meth:`snapshot` at each step end, :func:`phase_seconds` the difference of two. Time spent
    inside ``update`` is also kept per phase, so backward (with the loss and clipping) is ``update`` minus what ran
    inside it. A phase whose hook point is missing (the source moved on) stays absent, and its time falls in "other".
    """

    def __init__(self, sync=lambda: None):
        self.sync = sync  # torch.cuda.synchronize on a GPU: a phase ends when its kernels do
        self.seconds: Counter = Counter()
        self.running: list[tuple[str, float]] = []
        self.handles: list = []
        self.measured: set[str] = set()

    def begin(self, phase: str) -> None:
        self.sync()
        self.running.append((phase, time.perf_counter()))

    def end(self, phase: str) -> None:
        self.sync()
        name, started = self.running.pop()
        if name != phase:
            raise RuntimeError(f"phase {phase!r} ended inside {name!r}")
        elapsed = time.perf_counter() - started
        self.seconds[phase] += elapsed
        if phase != "update" and any(name == "update" for name, _ in self.running):
            self.seconds[f"{phase} in update"] += elapsed

    def wrap(self, owner, method: str, phase: str) -> None:
        """Time every call of ``owner.method`` (an instance attribute shadows the class's method)."""
        original = getattr(owner, method, None)
        if original is None:
            return

        def timed(*args, **kwargs):
            self.begin(phase)
            try:
                return original(*args, **kwargs)
            finally:
                self.end(phase)

        setattr(owner, method, timed)
        self.measured.add(phase)

    def attach(self, trainer, session) -> PhaseClock:
        """Hook a prepared ``PreferenceTrainer``: its algorithm's update, its reference, its policy, the optimizer."""
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.wrap(trainer.algorithm, "update", "update")
        self.wrap(getattr(session, "reference", None), "outputs", "reference")
        policy = getattr(session, "policy", None)
        if isinstance(policy, torch.nn.Module):
            self.handles += [policy.register_forward_pre_hook(lambda *_: self.begin("policy_forward")),
                             policy.register_forward_hook(lambda *_: self.end("policy_forward"))]
            self.measured.add("policy_forward")
        self.handles += [register_optimizer_step_pre_hook(lambda *_: self.begin("optimizer")),
                         register_optimizer_step_post_hook(lambda *_: self.end("optimizer"))]
        self.measured.add("optimizer")
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()

    def snapshot(self, sampler) -> dict[str, float]:
        return {**self.seconds, "generation": sampler.seconds["generation"],
                "judging": sampler.seconds.get("judging", 0.0)}


# preftune's phases, in the order a step runs them; "other" is the step's remainder.
PHASES = ("generation", "judging", "reference", "policy_forward", "backward", "optimizer", "other")


def phase_seconds(before: dict[str, float], after: dict[str, float], step_s: float, measured: set[str],
                  ) -> dict[str, float | None]:
    """One step's seconds per :data:`PHASES` from the :meth:`PhaseClock.snapshot` at its start and at its end."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in {*before, *after}}
    out: dict[str, float | None] = {
        "generation": d.get("generation"), "judging": d.get("judging"),
        "reference": d.get("reference") if "reference" in measured else None,
        "policy_forward": d.get("policy_forward") if "policy_forward" in measured else None,
        "optimizer": d.get("optimizer") if "optimizer" in measured else None,
        "backward": None,
    }
    if {"update", "policy_forward", "optimizer"} <= measured:
        out["backward"] = d.get("update", 0.0) - sum(d.get(f"{phase} in update", 0.0)
                                                     for phase in ("policy_forward", "reference", "optimizer"))
    out["other"] = step_s - sum(v for v in out.values() if v is not None)
    return out


def run_worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    steps_total = spec["warmup"] + spec["steps"]
    # On CPU one more step runs under the profiler, after the timed ones, for the tensor peak (not timed).
    tensor_peak = None if cuda else TensorPeak()
    steps_run = steps_total + (tensor_peak is not None)
    hwm_before_profile: list[int] = []

    def step_ended() -> None:
        if tensor_peak is None:
            return
        if len(ends) == steps_total:
            hwm_before_profile.append(_proc_status("VmHWM"))  # the profiler's own buffers stay out of peak RSS
            tensor_peak.start()
        elif len(ends) == steps_run:
            tensor_peak.stop()
    ends: list[float] = []
    at_end: list[dict[str, float]] = []  # cumulative seconds per phase (TRL: generation only) at each step end
    tok_at_end: list[int] = []
    clock: PhaseClock | None = None
    at_start: dict[str, float] = {}
    out_dir = tempfile.mkdtemp(prefix=f"bench-online-{spec['tool']}-")
    G = spec["group_size"] if spec["method"] == "grpo" else 2
    P = spec["prompts_per_step"]
    common = dict(learning_rate=1e-6, max_grad_norm=1.0, seed=42, weight_decay=0.0)

    if spec["tool"] == "preftune":
        from preftune.config import TrainConfig
        from preftune.training.loop import PreferenceTrainer

        method = dict(method="grpo", num_generations=G, beta=0.0, epsilon=0.2, scale_rewards="group",
                      grpo_loss_type="dapo") if spec["method"] == "grpo" else dict(method="online_dpo", beta=0.1)
        cfg = TrainConfig(model_name_or_path=spec["model_dir"], per_device_train_batch_size=P, max_steps=steps_run,
                          max_completion_length=spec["completion_tokens"], temperature=1.0, top_p=1.0, top_k=0,
                          bf16=spec["bf16"], logging_steps=1, output_dir=out_dir, overwrite_output_dir=True,
                          report_to=["none"], disable_tqdm=True, attn_implementation="sdpa", **common, **method,
                          **spec.get("preftune_set", {}))
        holder: dict = {}

        class StepClock:
            def on_step_end(self, step, model):
                ends.append(time.perf_counter())
                online = holder["trainer"].algorithm.sampler
                at_end.append(clock.snapshot(online))
                tok_at_end.append(online.generated_tokens)
                step_ended()

        trainer = PreferenceTrainer(cfg, train_dataset=[{"prompt": p} for p in spec["prompts"]],
                                    callbacks=[StepClock()], judge=reward)
        holder["trainer"] = trainer
        session = trainer._prepare()  # load model, reference and data before the clock starts, as TRL does in __init__
        clock = PhaseClock(torch.cuda.synchronize if cuda else lambda: None).attach(trainer, session)
        at_start = clock.snapshot(trainer.algorithm.sampler)
        train = trainer.train
    else:
        from transformers import TrainerCallback

        class StepClock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())
                at_end.append({"generation": sampler["seconds"]})
                tok_at_end.append(sampler["tokens"])
                step_ended()

        sampler = {"seconds": 0.0, "tokens": 0}
        hf = dict(output_dir=out_dir, per_device_train_batch_size=P * G if spec["method"] == "grpo" else P,
                  max_steps=steps_run, bf16=spec["bf16"], use_cpu=not cuda, logging_steps=1, save_strategy="no",
                  report_to="none", disable_tqdm=True, gradient_checkpointing=False, lr_scheduler_type="linear",
                  warmup_steps=0, **common)
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                     attn_implementation="sdpa")
        if spec["method"] == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            args = GRPOConfig(num_generations=G, max_completion_length=spec["completion_tokens"], temperature=1.0,
                              top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, scale_rewards="group", loss_type="dapo",
                              num_iterations=1, steps_per_generation=1, disable_dropout=True, **hf)
            data = Dataset.from_list([{"prompt": p} for p in spec["prompts"]])
            trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                                  processing_class=tokenizer, callbacks=[StepClock()])
        else:
            from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

            args = OnlineDPOConfig(max_new_tokens=spec["completion_tokens"], temperature=1.0, top_p=1.0, top_k=0,
                                   beta=[0.1], loss_type="sigmoid", disable_dropout=True, **hf)
            # TRL's Online DPO tokenizes without special tokens: the BOS is written into the text (same ids).
            data = Dataset.from_list([{"prompt": tokenizer.bos_token + p} for p in spec["prompts"]])
            trainer = OnlineDPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                                       processing_class=tokenizer, reward_processing_classes=tokenizer,
                                       callbacks=[StepClock()])
        policy = trainer.accelerator.unwrap_model(trainer.model)
        stops = _stop_ids(policy, tokenizer)
        original = policy.generate

        def timed_generate(*a, **kw):
            started = time.perf_counter()
            out = original(*a, **kw)
            if cuda:
                torch.cuda.synchronize()
            sampler["seconds"] += time.perf_counter() - started
            sampler["tokens"] += _generated_tokens(out[:, kw["input_ids"].shape[1]:], stops)
            return out

        policy.generate = timed_generate
        train = trainer.train

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _proc_status("VmRSS")
    started = time.perf_counter()
    train()
    wall = time.perf_counter() - started
    if clock is not None:
        clock.detach()
    w = spec["warmup"]
    if len(ends) != steps_run:
        raise RuntimeError(f"{spec['tool']} {spec['method']}: {len(ends)} step ends, expected {steps_run}")
    ends = ends[:steps_total]
    step_s = [b - a for a, b in zip(ends[w - 1:], ends[w:])] if w else [ends[0] - started] + [
        b - a for a, b in zip(ends, ends[1:])]
    snaps = [at_start or {"generation": 0.0}, *at_end]
    toks = [0, *tok_at_end]
    timed = range(w, steps_total)  # timed step k (0-based over all steps) spans ends[k-1] → ends[k]
    gen_s = [snaps[k + 1]["generation"] - snaps[k]["generation"] for k in timed]
    gen_tokens = [toks[k + 1] - toks[k] for k in timed]
    phases = None if clock is None else [phase_seconds(snaps[k], snaps[k + 1], step, clock.measured)
                                         for k, step in zip(timed, step_s)]
    summary_file = Path(out_dir) / "summary.json"  # preftune's own account of the run (all steps, profiled one too)
    run_summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "step_s": step_s, "generation_s": gen_s, "generated_tokens": gen_tokens, "completions_per_step": P * G,
        "phases_s": phases, "preftune_summary": run_summary and {k: run_summary.get(k) for k in
                                                                 ("train_runtime_s", "online", "global_step")},
        "train_wall_s": wall, "rss_before_train": rss_before,
        "vmhwm_after_train": hwm_before_profile[0] if hwm_before_profile else _proc_status("VmHWM"),
        "tensor_peak": None if tensor_peak is None else tensor_peak.peak,
        "tensor_at_step_start": None if tensor_peak is None else tensor_peak.at_start,
        "cuda_max_allocated": torch.cuda.max_memory_allocated() if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------- driver


def _other_load(seconds: float = 1.0) -> float:
    """Cores busy machine-wide over ``seconds`` (this process is idle meanwhile), from /proc/stat."""
    def busy():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)
    try:
        b0, t0 = busy()
        time.sleep(seconds)
        b1, t1 = busy()
        return (b1 - b0) / max(t1 - t0, 1) * os.cpu_count()
    except OSError:
        return float("nan")


def launch(spec: dict, work: Path, timeout: float) -> dict:
    """One run in a child process; wait4 gives its ru_maxrss (kept in the JSON, not reported: Linux carries this
    driver's own peak RSS over into a child across exec, a floor under every run)."""
    spec_file = work / f"spec-{spec['cell']}-{spec['tool']}-{spec['method']}-{spec['repeat']}.json"
    spec_file.write_text(json.dumps(spec))
    result_file = spec_file.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    log = open(spec_file.with_suffix(".log"), "w")
    load_before = _other_load()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_file), str(result_file)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - started > timeout:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    log.close()
    if not result_file.exists():
        tail = spec_file.with_suffix(".log").read_text()[-3000:]
        raise RuntimeError(f"run {spec['tool']} {spec['method']} failed (status {status}):\n{tail}")
    result = json.loads(result_file.read_text())
    result |= {"ru_maxrss": usage.ru_maxrss * 1024, "process_wall_s": time.perf_counter() - started,
               "machine_load_before": load_before}
    return result


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _peak_rss(run: dict) -> int:
    """The run's peak RSS up to the end of its timed steps: its own VmHWM, read before the profiled step where there
    was one (the profiler's buffers are not the tool's), else at the end of training."""
    return run["vmhwm_after_train"]


def summarise(runs: list[dict]) -> dict:
    """Per (method, tool): medians over repeats of each run's medians (phases: of each run's means, which add up to
    its mean step)."""
    table: dict = {}
    for method in METHODS:
        for tool in TOOLS:
            mine = [r for r in runs if r["method"] == method and r["tool"] == tool]
            if not mine:
                continue
            step = _median([statistics.median(r["step_s"]) for r in mine])
            gen = _median([statistics.median(r["generation_s"]) for r in mine])
            n = mine[0]["completions_per_step"]
            table.setdefault(method, {})[tool] = {
                "runs": len(mine), "timed_steps": len(mine[0]["step_s"]), "median_step_s": step,
                "completions_per_s": n / step, "generation_s": gen, "training_s": step - gen,
                "generated_tokens_per_step": _median([statistics.mean(r["generated_tokens"]) for r in mine]),
                "peak_rss": _median([_peak_rss(r) for r in mine]),
                "tensor_peak": _median([r.get("tensor_peak") for r in mine]),
                "rss_before_train": _median([r["rss_before_train"] for r in mine]),
                "train_rss_rise": _median([r["vmhwm_after_train"] - r["rss_before_train"] for r in mine]),
                "cuda_max_allocated": _median([r["cuda_max_allocated"] for r in mine]),
                "step_spread": [min(statistics.median(r["step_s"]) for r in mine),
                                max(statistics.median(r["step_s"]) for r in mine)],
                "phases_s": _phases(mine),
            }
        both = table.get(method, {})
        if len(both) == 2:
            p, t = both["preftune"], both["trl"]
            both["ratios"] = {
                "completions_per_s": p["completions_per_s"] / t["completions_per_s"],
                "generation_s": p["generation_s"] / t["generation_s"],
                "training_s": p["training_s"] / t["training_s"],
                "peak_rss": p["peak_rss"] / t["peak_rss"],
                "train_rss_rise": p["train_rss_rise"] / t["train_rss_rise"] if t["train_rss_rise"] > 0 else None,
                "tensor_peak": p["tensor_peak"] / t["tensor_peak"] if p["tensor_peak"] and t["tensor_peak"] else None,
                "cuda_max_allocated": (p["cuda_max_allocated"] / t["cuda_max_allocated"]
                                       if p["cuda_max_allocated"] and t["cuda_max_allocated"] else None),
            }
    return table


def _phases(runs: list[dict]) -> dict[str, float | None] | None:
    """Seconds per step of each phase and of the whole step: the mean over a run's timed steps (the phases add up to
    the step), the median over runs."""
    runs = [r for r in runs if r.get("phases_s")]
    if not runs:
        return None
    means = [{"step": statistics.mean(r["step_s"]),
              **{phase: None if r["phases_s"][0].get(phase) is None
                 else statistics.mean(step[phase] for step in r["phases_s"]) for phase in PHASES}} for r in runs]
    return {key: _median([m[key] for m in means]) for key in ("step", *PHASES)}


def headline(cells: list[dict]) -> dict:
    """The (shape, method) where preftune is least ahead of TRL in completions/s, and whether it is ahead on all."""
    rows = [(cell, method, both["ratios"]) for cell in cells for method, both in (cell.get("summary") or {}).items()
            if "ratios" in both]
    if not rows:
        return {}
    cell, method, ratios = min(rows, key=lambda row: row[2]["completions_per_s"])
    return {"cell": cell["cell"]["name"], "method": method, "completions_per_s": ratios["completions_per_s"],
            "peak_rss": ratios["peak_rss"], "body_to_head": cell["assets"]["parameter_split"]["body_to_head"],
            "ahead_everywhere": all(r["completions_per_s"] > 1 for _, _, r in rows)}


def _gib(x) -> str:
    return "–" if x is None else f"{x / 2**30:.2f}"


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:.0f}"


def _millions(n) -> str:
    return f"{n / 1e6:.1f}M"


def _seconds(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def machine_line(meta: dict) -> str:
    return (f"Machine: {meta['cpu']} ({meta['cores']} cores; {describe_cpu(meta['cpu_flags'])}), device "
            f"{meta['device']}; torch threads {meta['torch_threads']}. {meta['versions']}; preftune tree "
            f"{meta['commit']}.")


def report(meta: dict, cells: list[dict], top: dict) -> str:
    """The whole report: machine and settings, the matrix summary (worst ratio first), then each cell's tables."""
    lines = [f"# Online training benchmark: preftune vs TRL ({meta['stamp']})", "", machine_line(meta)]
    if meta.get("note"):
        lines += ["", f"**{meta['note']}**"]
    if meta.get("preftune_set"):
        lines += ["", "**Ablation: preftune runs with " + ", ".join(f"`{s}`" for s in meta["preftune_set"])
                  + "; TRL as without it.**"]
    lines += ["", f"Command: `{meta['command']}`", "",
              f"Llama-style models with random weights, untied embeddings (shapes below); {meta['prompts_per_step']} "
              f"prompts per optimizer step; GRPO G completions per prompt, Online DPO 2. "
              f"{'bf16 autocast' if meta['bf16'] else 'fp32'}, AdamW lr 1e-6, {meta['warmup']} warm-up step per run, "
              "tools alternating.", "",
              "Medians over repeats of each run's median step. completions/s = completions per step / median step; "
              "generation = time inside the sampler, training = step − generation; peak RSS = the run's process "
              "up to the end of its timed steps (the imported libraries and the loaded models are in it too, as the "
              "RSS before training shows); RSS rise = its VmHWM − VmRSS just before training"
              + ("; tensor peak = live tensors at the start of one more (untimed) step + the peak of torch's CPU "
                 "allocations during it, from the profiler: what CUDA's max_memory_allocated counts on a GPU, "
                 "without the libraries." if meta["device"] == "cpu" else
                 ". CUDA: max_memory_allocated over training.")]
    if top:
        lines += ["", "## Every shape: preftune / TRL", "", matrix_section(meta, cells, top)]
    for cell in cells:
        lines += ["", cell_section(cell)]
    return "\n".join(lines) + "\n"


def matrix_section(meta: dict, cells: list[dict], top: dict) -> str:
    """One row per (shape, method), the worst completions/s ratio first (bold), and the headline above."""
    rows = sorted(((cell, method, both) for cell in cells for method, both in (cell.get("summary") or {}).items()
                   if "ratios" in both), key=lambda row: row[2]["ratios"]["completions_per_s"])
    lines = [f"**Worst completions/s ratio preftune / TRL: ×{top['completions_per_s']:.2f}, {top['method']} on "
             f"{top['cell']}** (body {top['body_to_head']:.2f}× its LM head + embeddings; peak RSS "
             f"×{top['peak_rss']:.2f}). preftune ahead of TRL on every (shape, method): "
             f"{'yes' if top['ahead_everywhere'] else '**no**'}. CPU: {meta['cpu']} "
             f"({describe_cpu(meta['cpu_flags'])}), {meta['cores']} cores, torch threads {meta['torch_threads']}.", "",
             "| shape | body | LM head + embeddings | body ÷ (head + emb.) | prompt / completion tokens, G "
             "| timed steps × repeats | method | preftune completions/s | TRL completions/s | ratio "
             "| preftune peak RSS (GiB) | TRL peak RSS (GiB) | peak RSS ratio |",
             "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for cell, method, both in rows:
        c, split, (p, t), q = cell["cell"], cell["assets"]["parameter_split"], (both["preftune"], both["trl"]), \
            both["ratios"]
        ratio = f"×{q['completions_per_s']:.2f}"
        worst = c["name"] == top["cell"] and method == top["method"]
        lines.append(f"| {c['model_name']} | {_millions(split['body'])} | "
                     f"{_millions(split['head'] + split['embeddings'])} | {split['body_to_head']:.2f} | "
                     f"{c['prompt_tokens']} / {c['completion_tokens']}, {c['group_size']} | "
                     f"{p['timed_steps']} × {p['runs']} | {method} | {p['completions_per_s']:.2f} | "
                     f"{t['completions_per_s']:.2f} | {f'**{ratio}**' if worst else ratio} | {_gib(p['peak_rss'])} | "
                     f"{_gib(t['peak_rss'])} | ×{q['peak_rss']:.2f} |")
    return "\n".join(lines)


def cell_section(cell: dict) -> str:
    """One shape: its model, the tools' table, the ratios, and where preftune's step goes."""
    c, a, table = cell["cell"], cell["assets"], cell.get("summary") or {}
    split, shape = a["parameter_split"], c["model"]
    lines = [f"### {c['name']}", "",
             f"Model: {_millions(split['total'])} parameters: body {_millions(split['body'])} ({shape['layers']} "
             f"layers × {shape['hidden']}, {shape['heads']} heads, {shape['kv_heads']} KV heads, MLP "
             f"{shape['intermediate']}), LM head {_millions(split['head'])} + embeddings "
             f"{_millions(split['embeddings'])} (vocabulary {a['vocab_size']}); body ÷ (head + embeddings) = "
             f"{split['body_to_head']:.2f}. Prompts ≈{a['prompt_tokens_mean']:.1f} tokens (BOS included), completions "
             f"up to {c['completion_tokens']} tokens; GRPO G={c['group_size']}. {c['steps']} timed steps per run, "
             f"{c['repeats']} repeat(s)."]
    if cell.get("error"):
        return "\n".join([*lines, "", f"**Failed:** {cell['error']}"])
    head = ("| method | tool | completions/s | median step (s) | generation (s) | training (s) | "
            "generated tok/step | RSS before training (GiB) | peak RSS (GiB) | RSS rise (MiB) | tensor peak (GiB) | "
            "CUDA peak (GiB) | step range over runs (s) |")
    lines += ["", head, "|" + "---|" * 2 + "---:|" * 11]
    for method, both in table.items():
        for tool in TOOLS:
            if tool not in both:
                continue
            r = both[tool]
            lines.append(f"| {method} | {tool} | {r['completions_per_s']:.2f} | {r['median_step_s']:.2f} | "
                         f"{r['generation_s']:.2f} | {r['training_s']:.2f} | {r['generated_tokens_per_step']:.0f} | "
                         f"{_gib(r.get('rss_before_train'))} | {_gib(r['peak_rss'])} | "
                         f"{_mib(r['train_rss_rise'])} | {_gib(r.get('tensor_peak'))} | "
                         f"{_gib(r['cuda_max_allocated'])} | "
                         f"{r['step_spread'][0]:.2f}–{r['step_spread'][1]:.2f} |")
    lines.append("")
    for method, both in table.items():
        if "ratios" not in both:
            continue
        q = both["ratios"]
        verdict = lambda ratio: "PASS" if ratio <= 0.6 else "FAIL"  # noqa: E731
        if q["cuda_max_allocated"] is not None:
            memory = f"CUDA peak ×{q['cuda_max_allocated']:.2f} (target ≤ 0.6: {verdict(q['cuda_max_allocated'])})"
        else:
            memory = f"peak RSS ×{q['peak_rss']:.2f} (target ≤ 0.6: {verdict(q['peak_rss'])})"
            if q.get("tensor_peak") is not None:
                memory += f", tensor peak ×{q['tensor_peak']:.2f} (target ≤ 0.6: {verdict(q['tensor_peak'])})"
            memory += ", training RSS rise " + ("–" if q["train_rss_rise"] is None else f"×{q['train_rss_rise']:.2f}")
        lines.append(f"**{method}, preftune / TRL:** completions/s ×{q['completions_per_s']:.2f} "
                     f"(target ≥ 2: {'PASS' if q['completions_per_s'] >= 2 else 'FAIL'}); {memory}; "
                     f"generation time ×{q['generation_s']:.2f}, training time ×{q['training_s']:.2f}.")
        lines.append("")
    phases = [(method, both["preftune"]["phases_s"]) for method, both in table.items()
              if both.get("preftune", {}).get("phases_s")]
    if phases:
        lines += ["preftune's step by phase (seconds per step: mean over a run's timed steps, median over runs; "
                  "measured from outside its source, see PhaseClock; backward includes the loss and clipping, other "
                  "the collation, copies, schedule and log):", "",
                  "| method | mean step | " + " | ".join(PHASES) + " |", "|---|" + "---:|" * (len(PHASES) + 1)]
        lines += [f"| {method} | " + " | ".join(_seconds(seconds.get(key)) for key in ("step", *PHASES)) + " |"
                  for method, seconds in phases]
        lines.append("")
    lines += ["Same work, checked: identical prompt ids on both sides (built once, compared before any run); the "
              "generated tokens per step are measured above (random-init policy: completions rarely end before the "
              "length budget). Differences in how the work is done, not in what is computed: preftune encodes each "
              "prompt once for its group in the training forward and in generation; TRL repeats the prompt per "
              "completion in both. TRL's Online DPO runs the reference forward on every step as preftune does "
              "(the samples are new each step, nothing can be precomputed)."]
    return "\n".join(lines)


def _saved_cells(saved: dict) -> list[dict]:
    """The cells of a results file, summarised again; a file from before the shape options holds one, of the 4 × 256
    model."""
    if "cells" in saved:
        return [{**cell, "summary": summarise(cell["runs"])} for cell in saved["cells"]]
    m = saved["meta"]
    shape = ModelShape(DEFAULT_LAYERS, DEFAULT_HIDDEN, m["vocab_size"], max_positions=MAX_POSITIONS)
    cell = Cell(shape, m["prompt_tokens"], m["completion_tokens"], m["group_size"], m["steps"], m["repeats"])
    return [{"cell": cell_record(cell), "summary": summarise(saved["runs"]), "runs": saved["runs"],
             "assets": {"parameter_split": shape.parameter_split(), "vocab_size": m["vocab_size"],
                        "prompt_tokens_mean": m["prompt_tokens_mean"]}}]


def cell_record(cell: Cell) -> dict:
    return {"name": cell.name, "model_name": cell.model.name, "model": asdict(cell.model),
            **{k: v for k, v in asdict(cell).items() if k != "model"}}


# --------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, help="runs of each (method, tool) (default 3; --matrix: the cell's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, help="timed steps per run (default 3; --matrix: the cell's)")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="typical",
                        help="workload: vocabulary, prompt and completion lengths and group size (see SHAPES); "
                             "the four flags below override it one by one")
    parser.add_argument("--group-size", type=int, help="GRPO completions per prompt")
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--completion-tokens", type=int)
    add_shape_arguments(parser, f"{DEFAULT_LAYERS} layers × {DEFAULT_HIDDEN}, the --shape's vocabulary")
    parser.add_argument("--matrix", action="store_true",
                        help="run MATRIX (3 model shapes and workloads, one body ≥ 3× its LM head + embeddings) "
                             "instead of one shape; --steps and --repeats override every cell's")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: torch's; 1 is far steadier on a shared machine)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (default: fp32)")
    parser.add_argument("--preftune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a preftune config key for an ablation row (repeatable; e.g. reference_dtype=bfloat16); "
                             "TRL runs as it would without it")
    parser.add_argument("--note", default="", help="a line printed above the tables (e.g. machine sharing)")
    parser.add_argument("--work-dir", default=str(HERE / ".work" / "online"))
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--render", metavar="JSON", help="write the .md report of an earlier results file again")
    args = parser.parse_args(argv)
    given = [k for k in ("layers", "hidden_size", "intermediate_size", "heads", "kv_heads", "vocab_size",
                         "group_size", "prompt_tokens", "completion_tokens") if getattr(args, k) is not None]
    if args.matrix and given:
        parser.error("--matrix runs its own shapes and workloads (MATRIX): leave out " + ", ".join(given))
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def plan_cells(args: argparse.Namespace) -> list[Cell]:
    """MATRIX (with --steps / --repeats where given), or the one cell the options describe."""
    if args.matrix:
        return [replace(c, steps=args.steps or c.steps, repeats=args.repeats or c.repeats) for c in MATRIX]
    shape = ModelShape(args.layers or DEFAULT_LAYERS, args.hidden_size or DEFAULT_HIDDEN, args.vocab_size,
                       heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate_size,
                       max_positions=MAX_POSITIONS)
    return [Cell(shape, args.prompt_tokens, args.completion_tokens, args.group_size, steps=args.steps or 3,
                 repeats=args.repeats or 3)]


def run_cell(cell: Cell, args: argparse.Namespace, work: Path, methods: list[str]) -> dict:
    """Every (repeat, method, tool) of one cell, each a fresh process; the record of the cell for the results."""
    assets = build_assets(work, cell, (args.warmup + cell.steps) * args.prompts_per_step)
    print(f"{cell.name}: {_millions(assets['parameter_split']['body'])} body, "
          f"{_millions(assets['parameter_split']['head'] + assets['parameter_split']['embeddings'])} LM head + "
          f"embeddings (×{assets['parameter_split']['body_to_head']:.2f})", flush=True)
    base = dict(cell=cell.name, model_dir=assets["model_dir"], prompts=assets["prompts"], warmup=args.warmup,
                steps=cell.steps, prompts_per_step=args.prompts_per_step, group_size=cell.group_size,
                completion_tokens=cell.completion_tokens, bf16=args.bf16, threads=args.threads,
                preftune_set=dict(item.split("=", 1) for item in args.preftune_set))
    runs, error = [], None
    try:
        for repeat in range(cell.repeats):
            order = TOOLS if repeat % 2 == 0 else TOOLS[::-1]
            for method in methods:
                for tool in order:
                    spec = base | {"tool": tool, "method": method, "repeat": repeat}
                    result = launch(spec, work, args.timeout)
                    runs.append({"tool": tool, "method": method, "repeat": repeat} | result)
                    print(f"[{cell.name} {repeat}] {method:10s} {tool:8s} step "
                          f"{statistics.median(result['step_s']):.2f}s "
                          f"gen {statistics.median(result['generation_s']):.2f}s "
                          f"tokens/step {statistics.mean(result['generated_tokens']):.0f} peak RSS "
                          f"{_gib(_peak_rss(result))} GiB tensor peak {_gib(result.get('tensor_peak'))} GiB "
                          f"(load before {result['machine_load_before']:.2f})", flush=True)
    except RuntimeError as e:  # one failed shape does not lose the others
        lines = [line for line in str(e).splitlines() if line.strip()]
        error = lines[0] + (f" … {lines[-1]}" if len(lines) > 1 else "")
        print(f"{cell.name}: FAILED — {e}", flush=True)
    assets = {k: v for k, v in assets.items() if k != "prompts"}
    return {"cell": cell_record(cell), "assets": assets, "summary": summarise(runs), "runs": runs, "error": error}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        cells = _saved_cells(saved)
        meta = {"cpu_flags": {}, "prompts_per_step": saved["meta"].get("prompts_per_step", 4)} | saved["meta"]
        text = report(meta, cells, headline(cells))
        Path(args.render).with_suffix(".md").write_text(text)
        print(text)
        return 0
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        result = run_worker(spec)
        Path(args.worker[1]).write_text(json.dumps(result))
        return 0

    import importlib.metadata as md

    import torch

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True)
    versions = ", ".join(f"{name} {md.version(name)}" for name in ("torch", "transformers", "accelerate", "trl"))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    meta = {"stamp": stamp, "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "versions": versions, "commit": commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
            "command": "python benchmarks/bench_online.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "python": platform.python_version()} | {k: v for k, v in vars(args).items() if k != "worker"}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells: list[dict] = []
    for cell in plan_cells(args):
        cells.append(run_cell(cell, args, work, methods))
        runs = [r for c in cells for r in c["runs"]]
        if runs:  # the tools' own view of the machine, from their first run
            meta |= {"torch_threads": runs[0]["torch_threads"], "device": runs[0]["device"]}
        top = headline(cells)
        (out / f"online-{stamp}.json").write_text(json.dumps({"meta": meta, "headline": top, "cells": cells},
                                                             indent=1))
        text = report(meta, cells, top)
        (out / f"online-{stamp}.md").write_text(text)  # after every cell: a long matrix leaves what it measured
    print(text)
    return 0 if all(c["error"] is None for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
