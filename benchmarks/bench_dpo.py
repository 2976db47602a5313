"""Benchmark preftune's DPO training against TRL's DPOTrainer on the same model, data and hyperparameters.

    .venv/bin/python benchmarks/bench_dpo.py            # full run (both workloads, every configuration)
    .venv/bin/python benchmarks/bench_dpo.py --quick    # smoke test: workload a, one timed step per run
    .venv/bin/python benchmarks/bench_dpo.py --matrix   # the shape matrix (MATRIX): preftune against TRL's two
                                                        # fastest configurations on every shape
    .venv/bin/python benchmarks/bench_dpo.py --layers 16 --hidden-size 768 --vocab-size 16000 --workloads c

The model's shape (``--layers``, ``--hidden-size``, ``--intermediate-size``, ``--heads``, ``--kv-heads``,
``--vocab-size``; by default the ≈58M model of every earlier run) and the lengths (``--workloads``, or
``--prompt-tokens`` with ``--response-tokens``) are options; ``--matrix`` runs :data:`MATRIX`, from a model whose LM
head and embeddings outweigh its body to one whose body is 4.6× them, and heads the report with the worst
preftune/TRL ratio.

What it does, in order:

1. builds (once, under ``--work-dir``) a byte-level BPE tokenizer per vocabulary size, a Llama-style model per shape
   (random weights; by default 32k vocabulary, ≈58M parameters) and synthetic preference data per workload (see
   ``dpo_assets.py``);
2. measures the machine's matmul peak (fp32 and bf16 GEMMs, default torch threads), before and after the runs;
3. checks that both tools' first-step DPO loss is ln 2 on the same 4 pairs (reference = policy) and that their
   logged ``logps/chosen`` / ``logps/rejected`` agree;
4. runs every (tool, configuration, workload) in a fresh process, alternating preftune and TRL, each doing
   ``--warmup`` + ``--steps`` optimizer steps of 4 pairs (β 0.1, AdamW lr 1e-6, max_length 1024, seed 42);
5. prints a summary of every (shape, workload) cell — parameters of the body and of the LM head + embeddings, each
   tool's best pairs/s and peak RSS, their ratios — the worst pairs/s ratio first and as the headline, then a table
   per cell (median step time, pairs/s, tokens/s, peak RSS, MFU), and writes ``results/<timestamp>.json`` and
   ``.md``.

Definitions (the same for both tools):

* pairs/s = 4 / median wall time of the timed steps (step = end of one optimizer step to the end of the next);
* tokens/s = pairs/s × mean real tokens per pair of the dataset (prompt + chosen + rejected, the prompt counted
  once, BOS and EOS included; padding never counted);
* peak RSS = ``VmHWM`` of the run's process, read by the worker as it ends, i.e. the whole run including model
  loading and any reference precompute. Not ``ru_maxrss`` from ``os.wait4``: Linux carries the spawning process's
  peak over into the child's across ``exec``, so that would count the driver's own RSS (imports, the models it
  built) as a floor under every run; it is kept in the JSON (``ru_maxrss_gib``) and used only when a run died
  before reading ``VmHWM``;
* MFU = pairs/s × useful FLOPs per pair / measured matmul peak; FLOP convention in ``dpo_flops.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import dpo_assets
import dpo_flops
from dpo_assets import ModelShape, add_shape_arguments
from dpo_worker import PAIRS_PER_STEP, machine_busy_seconds
from machine import cpu_flags, cpu_model, describe_cpu

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "dpo_worker.py"
LN2 = math.log(2.0)

# TRL: its defaults (bf16 autocast + gradient checkpointing, online reference re-loaded from the model folder),
# fp32 without checkpointing, each with a precomputed reference, and the fastest-looking mix of knobs.
TRL_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "default+precompute": {"precompute_ref_log_probs": True},
    "fp32": {"bf16": False, "gradient_checkpointing": False},
    "fp32+precompute": {"bf16": False, "gradient_checkpointing": False, "precompute_ref_log_probs": True},
    "bf16-no-gc+precompute": {"gradient_checkpointing": False, "precompute_ref_log_probs": True},
}
# preftune: its defaults (bf16 autocast where the CPU has native bf16, else fp32) and fp32 forced; the best counts.
PREFTUNE_CONFIGS: dict[str, dict[str, Any]] = {"default": {}, "fp32": {"bf16": False}}
# Layout switches that may exist in preftune's TrainConfig; each is also run forced off (an ablation).
ABLATION_SWITCHES = ("prefix_sharing", "padding_free", "fused_mlp")
# Targets from the issue: preftune pairs/s at least this multiple of TRL's fastest configuration.
SPEED_TARGETS = {"a": 3.0, "b": 1.5}
MEMORY_TARGET = 0.5
CHECK_CONFIGS = {"preftune": {"bf16": False}, "trl": {"bf16": False, "gradient_checkpointing": False}}
CHECK_PAIRS = 4
CONTENDED = 0.25  # cores used by other processes during the timed steps above which a run is retried


@dataclass(frozen=True)
class Cell:
    """One point of the benchmark: a model shape, a workload (lengths), and the steps of each run."""

    shape: ModelShape
    workload: dpo_assets.Workload
    warmup: int
    steps: int

    @property
    def key(self) -> str:
        return f"{self.shape.name}/{self.workload.name}"


# --matrix: the shape of every earlier run (body 0.77× its LM head + embeddings), a head-heavy one (the online
# benchmark's 4 × 256 with a 32k vocabulary: 0.19×) and a body-heavy one (16 × 768 with a 16k vocabulary: 4.6×; a
# 7B Llama's body is ≈25× its head + embeddings). 16 × 768 with a 32k vocabulary would be only 2.3×.
MATRIX = (
    Cell(dpo_assets.DEFAULT_SHAPE, dpo_assets.WORKLOADS["a"], warmup=1, steps=3),
    Cell(ModelShape(layers=4, hidden=256, vocab=32_000), dpo_assets.WORKLOADS["c"], warmup=1, steps=3),
    Cell(ModelShape(layers=16, hidden=768, vocab=16_000), dpo_assets.WORKLOADS["c"], warmup=1, steps=3),
)
# What the matrix runs unless told otherwise: preftune's defaults against TRL's two fastest configurations in
# every earlier run (one per precision, so TRL's fastest is there on a CPU without native bf16 too); no ablations.
MATRIX_TRL_CONFIGS = ("fp32+precompute", "bf16-no-gc+precompute")
MATRIX_PREFTUNE_CONFIGS = ("default",)


# --------------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU, memory, versions and the preftune tree the numbers belong to."""
    versions = {}
    for name in ("torch", "transformers", "accelerate", "datasets", "tokenizers", "trl", "preftune"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "memory_gib": round(pages / 2**30, 1),
        "python": platform.python_version(),
        "versions": versions,
        "preftune_commit": git("rev-parse", "--short", "HEAD"),
        "preftune_uncommitted_files": [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()],
    }


def foreign_load(seconds: float = 3.0) -> float:
    """Cores kept busy by other processes while this one sleeps."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    return (machine_busy_seconds() - before) / seconds


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` cores; return the last load."""
    deadline = time.monotonic() + max_wait
    load = foreign_load()
    while load > threshold and time.monotonic() < deadline:
        print(f"  … waiting for the machine to quieten ({load:.2f} cores busy elsewhere)", flush=True)
        time.sleep(10)
        load = foreign_load()
    return load


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One (tool, configuration, shape, workload) run and, once done, its measurements."""

    tool: str
    config: str
    workload: str
    settings: dict[str, Any]
    purpose: str = "timing"  # timing | check
    ablation: str | None = None  # the switch forced off, for preftune ablations
    shape: str = dpo_assets.DEFAULT_SHAPE.name  # ModelShape.name
    # filled in after the run
    status: str = "pending"
    error: str | None = None
    step_seconds: list[float] = field(default_factory=list)
    compute_seconds: list[float] | None = None
    timed_seconds: list[float] = field(default_factory=list)
    median_step_s: float | None = None
    pairs_per_s: float | None = None
    tokens_per_s: float | None = None
    peak_rss_gib: float | None = None
    vm_hwm_gib: float | None = None
    cuda_peak_gib: float | None = None  # on a GPU: torch.cuda.max_memory_allocated over the run
    device: str | None = None  # on a GPU: the card's name
    ru_maxrss_gib: float | None = None  # wait4's, floored by the driver's RSS at the spawn (see the docstring)
    mfu: float | None = None
    mfu_own_precision: float | None = None
    wall_s: float | None = None
    setup_s: float | None = None
    load_before: float | None = None
    load_during: float | None = None
    first_loss: float | None = None
    first_logps_chosen: float | None = None
    first_logps_rejected: float | None = None
    step_other_load: list[float] | None = None
    effective: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1
    source_digest: str | None = None  # hash of the tool's .py files when the run started
    log: str | None = None

    @property
    def cell(self) -> str:
        """:attr:`Cell.key` of the run's shape and workload."""
        return f"{self.shape}/{self.workload}"

    @property
    def label(self) -> str:
        return f"{self.cell}/{self.tool}/{self.config}"

    @property
    def bf16(self) -> bool:
        """Whether the run computes in bf16: as the tool resolved it (preftune's default depends on the CPU), else
        as configured (TRL's default is bf16)."""
        if self.effective.get("bf16") is not None:
            return bool(self.effective["bf16"])
        return bool(self.settings.get("bf16", self.tool == "trl"))


def launch(run: Run, run_dir: Path, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the worker in a fresh process; returns its result with ``ru_maxrss`` and the foreign CPU load added."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = dict(os.environ, HF_DATASETS_CACHE=str(run_dir / "hf-datasets"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               PREFTUNE_CACHE=str(run_dir / "preftune-cache"), PYTHONWARNINGS="ignore::FutureWarning")
    log_path = run_dir / "log.txt"
    busy_before, started = machine_busy_seconds(), time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(spec_path)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=run_dir)
        while True:  # os.wait4 gives this child's own CPU time (its ru_maxrss: see the module docstring)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > timeout:
                os.kill(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    busy = machine_busy_seconds() - busy_before
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {
        "status": "failed", "error": f"no result (exit code {proc.returncode}; timeout {timeout:.0f} s?)"}
    result["ru_maxrss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    result["load_during"] = max(0.0, (busy - usage.ru_utime - usage.ru_stime) / wall)
    result["launch_wall_s"] = wall
    result["log"] = str(log_path)
    shutil.rmtree(run_dir / "run" / "final", ignore_errors=True)  # preftune's exported model: 230 MB, not needed
    return result


def summarise(run: Run, result: dict[str, Any], warmup: int, steps: int, tokens_per_pair: float,
              flops_per_pair: float, peak: dpo_flops.MatmulPeak) -> None:
    """Fill ``run`` from the worker's result: medians over the timed steps, throughput, memory, MFU."""
    run.status = result.get("status", "failed")
    run.error = result.get("error")
    run.log = result.get("log")
    run.load_during = result.get("load_during")
    run.wall_s = result.get("launch_wall_s")
    run.source_digest = result.get("source_digest")
    run.ru_maxrss_gib = result["ru_maxrss_bytes"] / 2**30
    if result.get("vm_hwm_bytes"):
        run.vm_hwm_gib = result["vm_hwm_bytes"] / 2**30
    run.peak_rss_gib = run.vm_hwm_gib or run.ru_maxrss_gib
    if result.get("cuda_peak_bytes") is not None:
        run.cuda_peak_gib, run.device = result["cuda_peak_bytes"] / 2**30, result.get("device")
    if run.status != "ok":
        return
    run.step_seconds = result["step_seconds"]
    run.compute_seconds = result.get("compute_seconds")
    run.first_loss = result.get("first_loss")
    run.first_logps_chosen = result.get("first_logps_chosen")
    run.first_logps_rejected = result.get("first_logps_rejected")
    run.effective = result.get("effective", {})
    run.setup_s = result["wall_seconds"] - sum(run.step_seconds)
    run.timed_seconds = run.step_seconds[warmup:warmup + steps]
    if not run.timed_seconds:
        run.status, run.error = "failed", f"only {len(run.step_seconds)} steps were timed"
        return
    run.step_other_load = result.get("step_other_load")
    timed_load = (run.step_other_load or [])[warmup:warmup + steps]
    if timed_load:  # other processes' CPU use during the timed steps only
        run.load_during = statistics.mean(timed_load)
    run.median_step_s = statistics.median(run.timed_seconds)
    run.pairs_per_s = PAIRS_PER_STEP / run.median_step_s
    run.tokens_per_s = run.pairs_per_s * tokens_per_pair
    run.mfu = run.pairs_per_s * flops_per_pair / peak.peak
    run.mfu_own_precision = run.pairs_per_s * flops_per_pair / peak.by_dtype["bfloat16" if run.bf16 else "float32"]


# --------------------------------------------------------------------------------------------- plan


def preftune_fields() -> set[str]:
    from preftune.config import FIELDS

    return set(FIELDS)


def plan_cell(cell: Cell, trl_names: list[str], preftune_names: list[str], ablations: bool) -> list[Run]:
    """The runs of one cell, alternating preftune and TRL (ablations are resolved when they start)."""
    fields, workload, shape = preftune_fields(), cell.workload.name, cell.shape.name
    ours = [Run("preftune", name, workload, dict(PREFTUNE_CONFIGS[name]), shape=shape) for name in preftune_names]
    if ablations:
        ours += [Run("preftune", f"no-{switch.replace('_', '-')}", workload, {}, ablation=switch, shape=shape)
                 for switch in ABLATION_SWITCHES if switch in fields]
    theirs = [Run("trl", name, workload, dict(TRL_CONFIGS[name]), shape=shape) for name in trl_names]
    return [r for pair in itertools.zip_longest(ours, theirs) for r in pair if r is not None]


def resolve_ablation(run: Run, done: list[Run]) -> None:
    """An ablation uses the precision of the fastest preftune configuration measured so far, switch forced off."""
    ours = [r for r in done if r.tool == "preftune" and r.cell == run.cell and r.ablation is None
            and r.purpose == "timing" and r.pairs_per_s]
    base = max(ours, key=lambda r: r.pairs_per_s).settings if ours else {}
    run.settings = {**base, run.ablation: False}
    run.config += "-fp32" if run.settings.get("bf16") is False else ""


@dataclass
class CellInputs:
    """What a cell's runs read: the model folder (with its parameter split), the jsonl and its token statistics,
    and the useful training FLOPs per pair."""

    assets: dpo_assets.Assets
    data: Path
    stats: dpo_assets.TokenStats
    flops: dict[str, float]
    dims: dpo_flops.ModelDims


def prepare_cell(work_dir: Path, shape: ModelShape, workload: dpo_assets.Workload, pairs: int) -> CellInputs:
    """The model of ``shape`` and ``pairs`` rows of ``workload`` in its tokenizer, built on first use."""
    from transformers import AutoTokenizer

    assets = dpo_assets.ensure_model(work_dir, shape)
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    dims = dpo_flops.ModelDims.from_config_file(assets.model_dir / "config.json")
    data, stats = dpo_assets.ensure_dataset(assets, tokenizer, workload, pairs)
    return CellInputs(assets, data, stats, dpo_flops.mean_pair_flops(dims, stats.per_pair), dims)


# --------------------------------------------------------------------------------------------- report


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "(defaults)"


def millions(n: float) -> str:
    return f"{n / 1e6:.1f}M"


def best(runs: list[Run], tool: str) -> Run | None:
    candidates = [r for r in runs if r.tool == tool and r.pairs_per_s and r.ablation is None and r.purpose == "timing"]
    return max(candidates, key=lambda r: r.pairs_per_s) if candidates else None


def comparison(runs: list[Run], workload: str) -> dict[str, Any]:
    """preftune's best configuration against TRL's fastest: the ratios and the targets."""
    ours, theirs = best(runs, "preftune"), best(runs, "trl")
    if ours is None or theirs is None:
        return {}
    trl_lowest = min(r.peak_rss_gib for r in runs if r.tool == "trl" and r.pairs_per_s)
    speed = ours.pairs_per_s / theirs.pairs_per_s
    memory = ours.peak_rss_gib / theirs.peak_rss_gib
    target = SPEED_TARGETS.get(workload)
    return {
        "preftune": ours.config, "trl": theirs.config,
        "preftune_pairs_per_s": ours.pairs_per_s, "trl_pairs_per_s": theirs.pairs_per_s,
        "preftune_peak_rss_gib": ours.peak_rss_gib, "trl_peak_rss_gib": theirs.peak_rss_gib,
        "timed_steps": len(ours.timed_seconds),
        "pairs_per_s_ratio": speed, "tokens_per_s_ratio": ours.tokens_per_s / theirs.tokens_per_s,
        "peak_rss_ratio": memory, "peak_rss_ratio_vs_lowest_trl": ours.peak_rss_gib / trl_lowest,
        "speed_target": target, "speed_pass": None if target is None else speed >= target,
        "memory_target": MEMORY_TARGET, "memory_pass": memory <= MEMORY_TARGET,
        "contended": any((r.load_during or 0.0) > CONTENDED for r in (ours, theirs)),
    }


def shape_text(split: dict[str, float], shape: ModelShape) -> str:
    """``57.9M parameters: body 25.2M (8 layers × 512, …), LM head 16.4M + embeddings 16.4M (body ÷ (head +
    embeddings) = 0.77)``."""
    return (f"{millions(split['total'])} parameters: body {millions(split['body'])} ({shape.layers} layers × "
            f"{shape.hidden}, {shape.heads} heads, {shape.kv_heads} KV heads, MLP {shape.intermediate}), LM head "
            f"{millions(split['head'])} + embeddings {millions(split['embeddings'])} (vocabulary {shape.vocab}); "
            f"body ÷ (head + embeddings) = {split['body_to_head']:.2f}")


def cell_section(runs: list[Run], cell: Cell, inputs: CellInputs) -> str:
    """A cell's model, tokens and FLOPs, the table of its runs, preftune's best against TRL's fastest, ablations."""
    stats, flops, workload = inputs.stats, inputs.flops, cell.workload
    lines = [
        f"### {cell.shape.name}, workload {workload.name}: {workload.description}",
        "",
        f"Model: Llama-style, {shape_text(inputs.assets.split, cell.shape)}. {cell.warmup} warm-up + {cell.steps} "
        "timed steps per run.",
        "",
        f"Mean tokens per pair: prompt {stats.prompt:.1f} + chosen {stats.chosen:.1f} + rejected "
        f"{stats.rejected:.1f} = {stats.unique_tokens_per_pair:.1f} (prompt once); useful training FLOPs per "
        f"pair {flops['total'] / 1e9:.1f} G (body {flops['body'] / 1e9:.1f}, LM head {flops['head'] / 1e9:.1f}, "
        f"attention {flops['attention'] / 1e9:.1f}).",
        "",
        "| tool | config | settings | timed steps (s) | median step (s) | pairs/s | tokens/s | peak RSS (GiB) "
        "| MFU | MFU vs own-precision peak | setup (s) | other load (cores) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        if r.status != "ok":
            lines.append(f"| {r.tool} | {r.config} | {settings_text(r.settings)} | **{r.status}**: {r.error} "
                         f"| | | | {fmt(r.peak_rss_gib, '.2f')} | | | | |")
            continue
        steps = " / ".join(f"{s:.1f}" for s in r.timed_seconds)
        config = r.config + (f" (attempt {r.attempt})" if r.attempt > 1 else "")
        lines.append(
            f"| {r.tool} | {config} | {settings_text(r.settings)} | {steps} | {r.median_step_s:.2f} "
            f"| {r.pairs_per_s:.3f} | {r.tokens_per_s:.0f} | {r.peak_rss_gib:.2f} | {100 * r.mfu:.1f}% "
            f"| {100 * r.mfu_own_precision:.1f}% | {fmt(r.setup_s, '.0f')} | {fmt(r.load_during, '.2f')} |")
    c = comparison(runs, workload.name)
    if c:
        def verdict(ok: bool | None) -> str:
            return "—" if ok is None else ("PASS" if ok else "FAIL")

        lines += [
            "",
            f"**preftune `{c['preftune']}` vs TRL `{c['trl']}` (TRL's fastest):** "
            f"pairs/s ×{c['pairs_per_s_ratio']:.2f} "
            f"(target ≥ {fmt(c['speed_target'], '.1f')}×: {verdict(c['speed_pass'])}); peak RSS "
            f"×{c['peak_rss_ratio']:.2f} (target ≤ {MEMORY_TARGET}: {verdict(c['memory_pass'])}; "
            f"×{c['peak_rss_ratio_vs_lowest_trl']:.2f} of TRL's lowest-memory configuration)."
            + (f" **Not comparable: other processes used more than {CONTENDED} cores during these runs.**"
               if c["contended"] else ""),
        ]
    ablations = [r for r in runs if r.ablation and r.pairs_per_s]
    for r in ablations:
        base = next((b for b in runs if b.tool == "preftune" and b.ablation is None and b.pairs_per_s
                     and b.purpose == "timing"
                     and b.settings == {k: v for k, v in r.settings.items() if k != r.ablation}), None)
        if base is not None:
            lines.append(f"- {r.ablation} on (auto) vs off: ×{base.pairs_per_s / r.pairs_per_s:.2f} pairs/s, "
                         f"peak RSS {base.peak_rss_gib:.2f} vs {r.peak_rss_gib:.2f} GiB")
    return "\n".join(lines)


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The cell where preftune's best is least ahead of TRL's fastest (pairs/s), with its shape."""
    measured = {key: c for key, c in report["comparison"].items() if c}
    if not measured:
        return {}
    key = min(measured, key=lambda k: measured[k]["pairs_per_s_ratio"])
    return {"cell": key, "body_to_head": report["cells"][key]["parameters"]["body_to_head"], **measured[key],
            "ahead_everywhere": all(c["pairs_per_s_ratio"] > 1 for c in measured.values())}


def matrix_section(report: dict[str, Any]) -> str:
    """Every cell in one table, the worst pairs/s ratio first (bold) and as the headline."""
    top, m = report.get("headline"), report["machine"]
    if not top:
        return ""
    order = sorted((k for k, c in report["comparison"].items() if c),
                   key=lambda k: report["comparison"][k]["pairs_per_s_ratio"])
    lines = [
        f"**Worst pairs/s ratio preftune / TRL: ×{top['pairs_per_s_ratio']:.2f} on {top['cell']}** (body "
        f"{top['body_to_head']:.2f}× its LM head + embeddings): preftune `{top['preftune']}` "
        f"{top['preftune_pairs_per_s']:.3f} pairs/s vs TRL `{top['trl']}` (its fastest) {top['trl_pairs_per_s']:.3f} "
        f"pairs/s, peak RSS ×{top['peak_rss_ratio']:.2f}. preftune ahead of TRL's fastest on every cell: "
        f"{'yes' if top['ahead_everywhere'] else '**no**'}. CPU: {m['cpu']} ({describe_cpu(m['cpu_flags'])}), "
        f"{m['cores']} cores, torch threads {report['matmul_peak']['threads']}.",
        "",
        "| shape | workload (prompt / response tokens) | body | LM head + embeddings | body ÷ (head + emb.) "
        "| timed steps | preftune pairs/s | TRL pairs/s (fastest) | pairs/s ratio | preftune peak RSS (GiB) "
        "| TRL peak RSS (GiB) | peak RSS ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in order:
        c, cell = report["comparison"][key], report["cells"][key]
        split, tokens = cell["parameters"], cell["tokens"]
        ratio = f"×{c['pairs_per_s_ratio']:.2f}"
        lines.append(
            f"| {cell['shape_name']} | {cell['workload']['name']} ({tokens['prompt']:.0f} / "
            f"{(tokens['chosen'] + tokens['rejected']) / 2:.0f}) | {millions(split['body'])} "
            f"| {millions(split['head'] + split['embeddings'])} | {split['body_to_head']:.2f} | {c['timed_steps']} "
            f"| {c['preftune_pairs_per_s']:.3f} (`{c['preftune']}`) | {c['trl_pairs_per_s']:.3f} (`{c['trl']}`) "
            f"| {f'**{ratio}**' if key == top['cell'] else ratio} | {c['preftune_peak_rss_gib']:.2f} "
            f"| {c['trl_peak_rss_gib']:.2f} | ×{c['peak_rss_ratio']:.2f} |")
    return "\n".join(lines)


def check_section(check: dict[str, Any]) -> str:
    if not check:
        return ""
    rows = ["| tool | config | first loss | logps/chosen | logps/rejected |", "|---|---|---:|---:|---:|"]
    for tool in ("preftune", "trl"):
        r = check.get(tool, {})
        rows.append(f"| {tool} | {settings_text(r.get('settings', {}))} | {fmt(r.get('first_loss'), '.6f')} "
                    f"| {fmt(r.get('first_logps_chosen'), '.3f')} | {fmt(r.get('first_logps_rejected'), '.3f')} |")
    return "\n".join([
        f"### First-step check ({CHECK_PAIRS} identical pairs of workload a on {check.get('shape', '?')}, "
        f"reference = policy): **{check['verdict']}**", "", *rows, "", check["detail"]])


def render_markdown(report: dict[str, Any], runs: list[Run], cells: list[Cell], inputs: dict[str, CellInputs]) -> str:
    m, peak = report["machine"], report["matmul_peak"]
    by_dtype = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peak["by_dtype"].items())
    parts = [
        f"# DPO benchmark: preftune vs TRL ({report['timestamp']})",
        "",
        f"Machine: {m['cpu']} ({describe_cpu(m['cpu_flags'])}), {m['cores']} cores, {m['memory_gib']} GiB; torch "
        f"threads {peak['threads']}. " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; preftune tree {m['preftune_commit']}"
        + (f" + uncommitted changes in {len(m['preftune_uncommitted_files'])} files" if m["preftune_uncommitted_files"]
           else ""),
        "",
        f"Command: `{report['command']}`",
        "",
        f"Llama-style models with random weights, untied embeddings (shapes below). 4 pairs/step, β 0.1, AdamW lr "
        f"1e-6, max_length 1024, seed {report['args']['seed']}.",
        "",
        f"Matmul peak (GFLOP/s, best GEMM): {by_dtype}; MFU uses the max, {peak['peak'] / 1e9:.0f} GFLOP/s. "
        f"FLOP convention: {dpo_flops.CONVENTION}.",
        "",
        "pairs/s = 4 / median step; tokens/s = pairs/s × mean real tokens per pair; peak RSS = VmHWM of the "
        "run's process, its whole life; 'other load' = cores used by other processes during the timed steps (≈ 0 on "
        f"a quiet machine; runs above {CONTENDED} are retried up to --rerun-contended times, the quietest attempt "
        "kept).",
    ]
    digests = {}
    for r in runs:
        if r.tool == "preftune" and r.source_digest:
            digests.setdefault(r.source_digest, []).append(f"{r.cell}/{r.config}")
    if len(digests) > 1:
        listing = "; ".join(f"`{d}`: {', '.join(names)}" for d, names in digests.items())
        parts += ["", f"**Warning: preftune's source changed during this benchmark** (hash of its .py files per run: "
                  f"{listing}). Runs with different hashes measure different code."]
    summary = matrix_section(report)
    if summary:
        parts += ["", "## Every shape: preftune's best against TRL's fastest", "", summary]
    if report.get("check"):
        parts += ["", check_section(report["check"])]
    for cell in cells:
        cell_runs = [r for r in runs if r.cell == cell.key and r.purpose == "timing"]
        if cell_runs:
            parts += ["", cell_section(cell_runs, cell, inputs[cell.key])]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------- check


def first_step_check(preftune_run: Run, trl_run: Run) -> dict[str, Any]:
    """Both first losses are ln 2 (reference = policy) and the logged log-probs agree."""
    problems = []
    for r in (preftune_run, trl_run):
        if r.status != "ok" or r.first_loss is None:
            problems.append(f"{r.tool}: run {r.status} ({r.error})")
        elif abs(r.first_loss - LN2) > 1e-4:
            problems.append(f"{r.tool}: first loss {r.first_loss:.6f} ≠ ln 2")
    for key in ("first_logps_chosen", "first_logps_rejected"):
        a, b = getattr(preftune_run, key), getattr(trl_run, key)
        if a is None or b is None:
            problems.append(f"{key}: not logged by both")
        elif abs(a - b) > 1e-2 + 1e-4 * abs(b):
            problems.append(f"{key}: preftune {a:.4f} vs TRL {b:.4f}")
    tolerance = "|loss − ln 2| ≤ 1e-4; |Δ logps| ≤ 1e-2 + 1e-4·|logps|"
    detail = ("All within tolerance (" + tolerance + ")." if not problems
              else "Problems: " + "; ".join(problems) + f" (tolerance: {tolerance}).")
    return {
        "verdict": "PASS" if not problems else "FAIL",
        "detail": detail,
        **{r.tool: {"settings": r.settings, "first_loss": r.first_loss, "first_logps_chosen": r.first_logps_chosen,
                    "first_logps_rejected": r.first_logps_rejected} for r in (preftune_run, trl_run)},
    }


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", help="comma-separated workloads of dpo_assets.WORKLOADS (a: long prompts, b: short, "
                                       "c: medium); default a,b")
    p.add_argument("--prompt-tokens", type=int, help="a workload of its own: prompts of about this many tokens "
                                                     "(with --response-tokens)")
    p.add_argument("--response-tokens", type=int, help="… and responses of about this many tokens")
    add_shape_arguments(p, "the 58M model, 8 layers × 512, vocabulary 32000")
    p.add_argument("--matrix", action="store_true",
                   help="run MATRIX (3 shapes, one whose body is ≥ 3× its LM head + embeddings) instead of one shape; "
                        "unless given, TRL runs " + ", ".join(MATRIX_TRL_CONFIGS) + ", preftune its defaults, no "
                        "ablations, and each cell its own step counts")
    p.add_argument("--steps", type=int, help="timed optimizer steps per run (default 3; --matrix: the cell's)")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps before them (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: workload a (--matrix: every cell), 1 warm-up + "
                                                        "1 timed step")
    p.add_argument("--trl-configs", help=f"subset of {list(TRL_CONFIGS)} (default all)")
    p.add_argument("--preftune-configs", help=f"subset of {list(PREFTUNE_CONFIGS)} (default all)")
    p.add_argument("--no-ablations", action="store_true", help="skip preftune runs with a layout switch forced off")
    p.add_argument("--no-check", action="store_true", help="skip the first-step loss check")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work-dir", type=Path, default=HERE / ".work", help="model, data and run folders (not committed)")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    p.add_argument("--max-idle-wait", type=float, default=120,
                   help="seconds to wait before each run for other processes to stop using the CPU")
    p.add_argument("--rerun-contended", type=int, default=1,
                   help=f"re-run a run up to this many times when other processes used more than "
                        f"{CONTENDED} cores during its timed steps (the least contended attempt is kept)")
    args = p.parse_args(argv)
    shape_given = [k for k in ("layers", "hidden_size", "intermediate_size", "heads", "kv_heads", "vocab_size")
                   if getattr(args, k) is not None]
    if args.matrix and (shape_given or args.workloads or args.prompt_tokens or args.response_tokens):
        p.error("--matrix runs its own shapes and workloads (MATRIX): leave out the shape and workload options")
    if (args.prompt_tokens is None) != (args.response_tokens is None):
        p.error("--prompt-tokens and --response-tokens go together")
    if args.quick:
        args.steps, args.warmup = 1, 1
        args.workloads = None if args.matrix or args.prompt_tokens else "a"
    return args


def plan_cells(args: argparse.Namespace) -> list[Cell]:
    """The cells to run: MATRIX, or the one shape of the options with each workload."""
    if args.matrix:
        return [replace(c, warmup=c.warmup if args.warmup is None else args.warmup,
                        steps=c.steps if args.steps is None else args.steps) for c in MATRIX]
    d = dpo_assets.DEFAULT_SHAPE
    shape = ModelShape(layers=args.layers or d.layers, hidden=args.hidden_size or d.hidden,
                       vocab=args.vocab_size or d.vocab, heads=args.heads, kv_heads=args.kv_heads,
                       intermediate=args.intermediate_size)
    if args.prompt_tokens is not None:
        p, r = args.prompt_tokens, args.response_tokens
        workloads = [dpo_assets.Workload(f"p{p}r{r}", f"≈{p}-token prompt, ≈{r}-token responses", p, r)]
    else:
        names = [w.strip() for w in (args.workloads or "a,b").split(",") if w.strip()]
        unknown = set(names) - set(dpo_assets.WORKLOADS)
        if unknown:
            raise SystemExit(f"unknown workloads {sorted(unknown)}; choose from {list(dpo_assets.WORKLOADS)}")
        workloads = [dpo_assets.WORKLOADS[name] for name in names]
    warmup, steps = 1 if args.warmup is None else args.warmup, 3 if args.steps is None else args.steps
    return [Cell(shape, workload, warmup, steps) for workload in workloads]


def config_names(given: str | None, matrix: bool, matrix_default: tuple[str, ...], known: dict) -> list[str]:
    names = [c.strip() for c in given.split(",") if c.strip()] if given else list(matrix_default if matrix else known)
    unknown = set(names) - set(known)
    if unknown:
        raise SystemExit(f"unknown {sorted(unknown)}; choose from {list(known)}")
    return names


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cells = plan_cells(args)
    trl_names = config_names(args.trl_configs, args.matrix, MATRIX_TRL_CONFIGS, TRL_CONFIGS)
    preftune_names = config_names(args.preftune_configs, args.matrix, MATRIX_PREFTUNE_CONFIGS, PREFTUNE_CONFIGS)
    ablations = not (args.no_ablations or args.matrix)

    timestamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    runs_root = args.work_dir / "runs" / timestamp
    args.results_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_dpo.py " + " ".join(sys.argv[1:] if argv is None else argv)

    print(f"[{timestamp}] building inputs under {args.work_dir} …", flush=True)
    inputs: dict[str, CellInputs] = {}
    for cell in cells:
        inputs[cell.key] = got = prepare_cell(args.work_dir, cell.shape, cell.workload,
                                              (cell.warmup + cell.steps) * PAIRS_PER_STEP)
        print(f"  {cell.key}: {shape_text(got.assets.split, cell.shape)}; {got.stats.pairs} pairs, tokens/pair "
              f"{got.stats.summary()}", flush=True)

    def measure_peak() -> dpo_flops.MatmulPeak:
        wait_for_quiet(args.max_idle_wait)
        busy, own, started = machine_busy_seconds(), time.process_time(), time.perf_counter()
        peak = dpo_flops.measure_matmul_peak()
        load = (machine_busy_seconds() - busy - (time.process_time() - own)) / (time.perf_counter() - started)
        peak_loads.append(round(max(0.0, load), 3))
        return peak

    print("measuring the matmul peak …", flush=True)
    peak_loads: list[float] = []
    peaks = [measure_peak()]
    print(f"  {', '.join(f'{k} {v / 1e9:.0f} GFLOP/s' for k, v in peaks[0].by_dtype.items())}", flush=True)

    report: dict[str, Any] = {
        "timestamp": timestamp, "command": command, "args": {k: str(v) if isinstance(v, Path) else v
                                                             for k, v in vars(args).items()},
        "machine": machine_info(), "flop_convention": dpo_flops.CONVENTION, "matmul_peak": peaks[0].to_dict(),
        "cells": {cell.key: {"shape_name": cell.shape.name, "shape": asdict(cell.shape),
                             "model_dir": str(inputs[cell.key].assets.model_dir),
                             "parameters": inputs[cell.key].assets.split, "dims": asdict(inputs[cell.key].dims),
                             "workload": asdict(cell.workload), "tokens": inputs[cell.key].stats.summary(),
                             "flops_per_pair": inputs[cell.key].flops, "data": str(inputs[cell.key].data),
                             "warmup": cell.warmup, "steps": cell.steps} for cell in cells},
        "check": {}, "runs": [], "comparison": {}, "headline": {},
    }
    runs: list[Run] = []
    json_path, md_path = args.results_dir / f"{timestamp}.json", args.results_dir / f"{timestamp}.md"

    def save() -> None:
        report["runs"] = [asdict(r) for r in runs]
        report["comparison"] = {cell.key: comparison([r for r in runs if r.cell == cell.key and r.purpose == "timing"],
                                                     cell.workload.name) for cell in cells}
        report["headline"] = headline(report)
        json_path.write_text(json.dumps(report, indent=2))
        md_path.write_text(render_markdown(report, runs, cells, inputs))

    def execute(template: Run, cell: CellInputs, warmup: int, steps: int, name: str, retries: int) -> Run:
        kept: Run | None = None
        for attempt in range(1, retries + 2):
            run = replace(template, attempt=attempt)
            run.load_before = wait_for_quiet(args.max_idle_wait)
            print(f"→ {run.label} [{settings_text(run.settings)}]" + (f" (attempt {attempt})" if attempt > 1 else "")
                  + " …", flush=True)
            spec = {"tool": run.tool, "model_dir": str(cell.assets.model_dir.resolve()),
                    "data_path": str(cell.data.resolve()), "warmup": warmup, "steps": steps, "seed": args.seed,
                    "settings": run.settings}
            suffix = f"-attempt{attempt}" if attempt > 1 else ""
            result = launch(run, runs_root / f"{name}{suffix}", spec, args.timeout)
            summarise(run, result, warmup, steps, cell.stats.unique_tokens_per_pair, cell.flops["total"], peaks[0])
            if run.status != "ok":
                print(f"  FAILED: {run.error} (log: {run.log})", flush=True)
                kept = kept or run
                break  # a failure is not a measurement problem: do not retry
            steps_text = " ".join(f"{s:.1f}" for s in run.step_seconds)
            print(f"  steps (s): {steps_text} | {fmt(run.pairs_per_s, '.3f')} pairs/s | peak RSS "
                  f"{run.peak_rss_gib:.2f} GiB | other load {run.load_during:.2f} cores", flush=True)
            if kept is None or kept.status != "ok" or run.load_during < kept.load_during:
                kept = run
            if run.load_during <= CONTENDED:
                break
        runs.append(kept)
        save()
        return kept

    if not args.no_check:  # on the first cell's model: workload a, one batch
        shape = cells[0].shape
        check = prepare_cell(args.work_dir, shape, dpo_assets.WORKLOADS["a"], CHECK_PAIRS)
        inputs.setdefault(f"{shape.name}/a", check)
        check_runs = [execute(Run(tool, "check", "a", dict(settings), purpose="check", shape=shape.name), check, 0, 1,
                              f"00-check-{i}-{tool}", retries=0)
                      for i, (tool, settings) in enumerate(CHECK_CONFIGS.items())]
        report["check"] = {**first_step_check(*check_runs), "shape": shape.name}
        print(f"first-step check: {report['check']['verdict']} — {report['check']['detail']}", flush=True)
        save()

    index = itertools.count(1)
    for cell in cells:
        for run in plan_cell(cell, trl_names, preftune_names, ablations):
            if run.ablation:
                resolve_ablation(run, runs)
            execute(run, inputs[cell.key], cell.warmup, cell.steps,
                    f"{next(index):02d}-{cell.shape.name}-{cell.workload.name}-{run.tool}-{run.config}",
                    retries=args.rerun_contended)

    print("measuring the matmul peak again …", flush=True)
    peaks.append(measure_peak())
    by_dtype = {k: max(p.by_dtype[k] for p in peaks) for k in peaks[0].by_dtype}
    peak = dpo_flops.MatmulPeak(peaks[0].threads, by_dtype, [s for p in peaks for s in p.samples])
    report["matmul_peak"] = {**peak.to_dict(), "other_load_during": peak_loads}
    for run in runs:  # MFU against the best peak seen in either measurement
        if run.pairs_per_s:
            flops = inputs[run.cell].flops["total"]
            run.mfu = run.pairs_per_s * flops / peak.peak
            run.mfu_own_precision = run.pairs_per_s * flops / peak.by_dtype["bfloat16" if run.bf16 else "float32"]
    report["children_max_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    save()
    print()
    print(md_path.read_text())
    print(f"results: {json_path} and {md_path}")
    return report


if __name__ == "__main__":
    main()
