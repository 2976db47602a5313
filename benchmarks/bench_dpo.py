"""Benchmark preftune's DPO training against TRL's DPOTrainer on the same model, data and hyperparameters.

    .venv/bin/python benchmarks/bench_dpo.py            # full run (both workloads, every configuration)
    .venv/bin/python benchmarks/bench_dpo.py --quick    # smoke test: workload a, one timed step per run

What it does, in order:

1. builds (once, under ``--work-dir``) a 32k-vocab byte-level BPE tokenizer, a ≈58M-parameter Llama-style model
   and synthetic preference data per workload (see ``dpo_assets.py``);
2. measures the machine's matmul peak (fp32 and bf16 GEMMs, default torch threads), before and after the runs;
3. checks that both tools' first-step DPO loss is ln 2 on the same 4 pairs (reference = policy) and that their
   logged ``logps/chosen`` / ``logps/rejected`` agree;
4. runs every (tool, configuration, workload) in a fresh process, alternating preftune and TRL, each doing
   ``--warmup`` + ``--steps`` optimizer steps of 4 pairs (β 0.1, AdamW lr 1e-6, max_length 1024, seed 42);
5. prints a markdown table per workload (median step time, pairs/s, tokens/s, peak RSS, MFU) with the ratios
   preftune/TRL, and writes ``results/<timestamp>.json`` and ``.md``.

Definitions (the same for both tools):

* pairs/s = 4 / median wall time of the timed steps (step = end of one optimizer step to the end of the next);
* tokens/s = pairs/s × mean real tokens per pair of the dataset (prompt + chosen + rejected, the prompt counted
  once, BOS and EOS included; padding never counted);
* peak RSS = ``ru_maxrss`` of the run's process (``os.wait4``), i.e. the whole run including model loading and
  any reference precompute;
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
from dpo_worker import PAIRS_PER_STEP, machine_busy_seconds

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


# --------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
    """One (tool, configuration, workload) run and, once done, its measurements."""

    tool: str
    config: str
    workload: str
    settings: dict[str, Any]
    purpose: str = "timing"  # timing | check
    ablation: str | None = None  # the switch forced off, for preftune ablations
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
    def label(self) -> str:
        return f"{self.workload}/{self.tool}/{self.config}"

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
        while True:  # os.wait4 gives this child's own rusage (peak RSS, CPU time)
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
    run.peak_rss_gib = result["ru_maxrss_bytes"] / 2**30
    if result.get("vm_hwm_bytes"):
        run.vm_hwm_gib = result["vm_hwm_bytes"] / 2**30
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


def plan_workload(workload: str, trl_names: list[str], preftune_names: list[str], ablations: bool) -> list[Run]:
    """The runs of one workload, alternating preftune and TRL (ablations are resolved when they start)."""
    fields = preftune_fields()
    ours = [Run("preftune", name, workload, dict(PREFTUNE_CONFIGS[name])) for name in preftune_names]
    if ablations:
        ours += [Run("preftune", f"no-{switch.replace('_', '-')}", workload, {}, ablation=switch)
                 for switch in ABLATION_SWITCHES if switch in fields]
    theirs = [Run("trl", name, workload, dict(TRL_CONFIGS[name])) for name in trl_names]
    order = [r for pair in itertools.zip_longest(ours, theirs) for r in pair if r is not None]
    return order


def resolve_ablation(run: Run, done: list[Run]) -> None:
    """An ablation uses the precision of the fastest preftune configuration measured so far, switch forced off."""
    ours = [r for r in done if r.tool == "preftune" and r.workload == run.workload and r.ablation is None
            and r.purpose == "timing" and r.pairs_per_s]
    base = max(ours, key=lambda r: r.pairs_per_s).settings if ours else {}
    run.settings = {**base, run.ablation: False}
    run.config += "-fp32" if run.settings.get("bf16") is False else ""


# --------------------------------------------------------------------------------------------- report


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "(defaults)"


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
        "pairs_per_s_ratio": speed, "tokens_per_s_ratio": ours.tokens_per_s / theirs.tokens_per_s,
        "peak_rss_ratio": memory, "peak_rss_ratio_vs_lowest_trl": ours.peak_rss_gib / trl_lowest,
        "speed_target": target, "speed_pass": None if target is None else speed >= target,
        "memory_target": MEMORY_TARGET, "memory_pass": memory <= MEMORY_TARGET,
        "contended": any((r.load_during or 0.0) > CONTENDED for r in (ours, theirs)),
    }


def workload_table(runs: list[Run], workload: dpo_assets.Workload, stats: dpo_assets.TokenStats,
                   flops: dict[str, float]) -> str:
    lines = [
        f"### Workload {workload.name}: {workload.description}",
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


def check_section(check: dict[str, Any]) -> str:
    if not check:
        return ""
    rows = ["| tool | config | first loss | logps/chosen | logps/rejected |", "|---|---|---:|---:|---:|"]
    for tool in ("preftune", "trl"):
        r = check.get(tool, {})
        rows.append(f"| {tool} | {settings_text(r.get('settings', {}))} | {fmt(r.get('first_loss'), '.6f')} "
                    f"| {fmt(r.get('first_logps_chosen'), '.3f')} | {fmt(r.get('first_logps_rejected'), '.3f')} |")
    return "\n".join([
        f"### First-step check ({CHECK_PAIRS} identical pairs of workload a, reference = policy): "
        f"**{check['verdict']}**", "", *rows, "", check["detail"]])


def render_markdown(report: dict[str, Any], runs: list[Run], workloads: dict, stats: dict, flops: dict) -> str:
    m, peak = report["machine"], report["matmul_peak"]
    by_dtype = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peak["by_dtype"].items())
    parts = [
        f"# DPO benchmark: preftune vs TRL ({report['timestamp']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch threads {peak['threads']}. "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; preftune tree {m['preftune_commit']}"
        + (f" + uncommitted changes in {len(m['preftune_uncommitted_files'])} files" if m["preftune_uncommitted_files"]
           else ""),
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model: Llama-style, {report['model']['parameters'] / 1e6:.1f}M parameters, vocab {dpo_assets.VOCAB_SIZE}, "
        f"{settings_text(dpo_assets.MODEL_CONFIG)}. 4 pairs/step, β 0.1, AdamW lr 1e-6, max_length 1024, seed "
        f"{report['args']['seed']}; {report['args']['warmup']} warm-up + {report['args']['steps']} timed steps "
        "per run.",
        "",
        f"Matmul peak (GFLOP/s, best GEMM): {by_dtype}; MFU uses the max, {peak['peak'] / 1e9:.0f} GFLOP/s. "
        f"FLOP convention: {dpo_flops.CONVENTION}.",
        "",
        "pairs/s = 4 / median step; tokens/s = pairs/s × mean real tokens per pair; peak RSS = ru_maxrss of the "
        "run's process; 'other load' = cores used by other processes during the timed steps (≈ 0 on a quiet machine; "
        "runs above " + str(CONTENDED) + " are retried up to --rerun-contended times, the quietest attempt kept).",
    ]
    digests = {}
    for r in runs:
        if r.tool == "preftune" and r.source_digest:
            digests.setdefault(r.source_digest, []).append(f"{r.workload}/{r.config}")
    if len(digests) > 1:
        listing = "; ".join(f"`{d}`: {', '.join(names)}" for d, names in digests.items())
        parts += ["", f"**Warning: preftune's source changed during this benchmark** (hash of its .py files per run: "
                  f"{listing}). Runs with different hashes measure different code."]
    if report.get("check"):
        parts += ["", check_section(report["check"])]
    for name, workload in workloads.items():
        wl_runs = [r for r in runs if r.workload == name and r.purpose == "timing"]
        if wl_runs:
            parts += ["", workload_table(wl_runs, workload, stats[name], flops[name])]
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
    p.add_argument("--workloads", default="a,b", help="comma-separated workloads (a: long prompts, b: short)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before them")
    p.add_argument("--quick", action="store_true", help="smoke test: workload a, 1 warm-up + 1 timed step")
    p.add_argument("--trl-configs", default=",".join(TRL_CONFIGS), help=f"subset of {list(TRL_CONFIGS)}")
    p.add_argument("--preftune-configs", default=",".join(PREFTUNE_CONFIGS), help=f"subset of {list(PREFTUNE_CONFIGS)}")
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
    if args.quick:
        args.workloads, args.steps, args.warmup = "a", 1, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    workload_names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    trl_names = [c.strip() for c in args.trl_configs.split(",") if c.strip()]
    preftune_names = [c.strip() for c in args.preftune_configs.split(",") if c.strip()]
    for name, known in ((workload_names, dpo_assets.WORKLOADS), (trl_names, TRL_CONFIGS),
                        (preftune_names, PREFTUNE_CONFIGS)):
        unknown = set(name) - set(known)
        if unknown:
            raise SystemExit(f"unknown {sorted(unknown)}; choose from {list(known)}")

    timestamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    runs_root = args.work_dir / "runs" / timestamp
    args.results_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_dpo.py " + " ".join(sys.argv[1:] if argv is None else argv)

    print(f"[{timestamp}] building inputs under {args.work_dir} …", flush=True)
    assets = dpo_assets.ensure_model(args.work_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    dims = dpo_flops.ModelDims.from_config_file(assets.model_dir / "config.json")
    pairs = (args.warmup + args.steps) * PAIRS_PER_STEP
    workloads = {name: dpo_assets.WORKLOADS[name] for name in workload_names}
    data, stats, flops = {}, {}, {}
    for name, workload in workloads.items():
        data[name], stats[name] = dpo_assets.ensure_dataset(assets, tokenizer, workload, pairs)
        flops[name] = dpo_flops.mean_pair_flops(dims, stats[name].per_pair)
        print(f"  workload {name}: {pairs} pairs, tokens/pair {stats[name].summary()}", flush=True)

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
        "machine": machine_info(), "model": {"path": str(assets.model_dir), "parameters": assets.parameters,
                                             "config": dpo_assets.MODEL_CONFIG, "dims": asdict(dims)},
        "flop_convention": dpo_flops.CONVENTION, "matmul_peak": peaks[0].to_dict(),
        "workloads": {n: {"spec": asdict(w), "tokens": stats[n].summary(), "flops_per_pair": flops[n],
                          "data": str(data[n])} for n, w in workloads.items()},
        "check": {}, "runs": [], "comparison": {},
    }
    runs: list[Run] = []
    json_path, md_path = args.results_dir / f"{timestamp}.json", args.results_dir / f"{timestamp}.md"

    def save() -> None:
        report["runs"] = [asdict(r) for r in runs]
        report["comparison"] = {n: comparison([r for r in runs if r.workload == n and r.purpose == "timing"], n)
                                for n in workloads}
        json_path.write_text(json.dumps(report, indent=2))
        md_path.write_text(render_markdown(report, runs, workloads, stats, flops))

    def execute(template: Run, data_path: Path, warmup: int, steps: int, name: str, retries: int) -> Run:
        kept: Run | None = None
        for attempt in range(1, retries + 2):
            run = replace(template, attempt=attempt)
            run.load_before = wait_for_quiet(args.max_idle_wait)
            print(f"→ {run.label} [{settings_text(run.settings)}]" + (f" (attempt {attempt})" if attempt > 1 else "")
                  + " …", flush=True)
            spec = {"tool": run.tool, "model_dir": str(assets.model_dir.resolve()),
                    "data_path": str(data_path.resolve()), "warmup": warmup, "steps": steps, "seed": args.seed,
                    "settings": run.settings}
            suffix = f"-attempt{attempt}" if attempt > 1 else ""
            result = launch(run, runs_root / f"{name}{suffix}", spec, args.timeout)
            summarise(run, result, warmup, steps, stats[run.workload].unique_tokens_per_pair,
                      flops[run.workload]["total"], peaks[0])
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

    if not args.no_check:
        check_path, check_stats = dpo_assets.ensure_dataset(assets, tokenizer, dpo_assets.WORKLOADS["a"], CHECK_PAIRS)
        stats.setdefault("a", check_stats)
        flops.setdefault("a", dpo_flops.mean_pair_flops(dims, check_stats.per_pair))
        check_runs = [execute(Run(tool, "check", "a", dict(settings), purpose="check"), check_path, 0, 1,
                              f"00-check-{i}-{tool}", retries=0)
                      for i, (tool, settings) in enumerate(CHECK_CONFIGS.items())]
        report["check"] = first_step_check(*check_runs)
        print(f"first-step check: {report['check']['verdict']} — {report['check']['detail']}", flush=True)
        save()

    index = itertools.count(1)
    for name in workload_names:
        for run in plan_workload(name, trl_names, preftune_names, not args.no_ablations):
            if run.ablation:
                resolve_ablation(run, runs)
            execute(run, data[name], args.warmup, args.steps, f"{next(index):02d}-{name}-{run.tool}-{run.config}",
                    retries=args.rerun_contended)

    print("measuring the matmul peak again …", flush=True)
    peaks.append(measure_peak())
    by_dtype = {k: max(p.by_dtype[k] for p in peaks) for k in peaks[0].by_dtype}
    peak = dpo_flops.MatmulPeak(peaks[0].threads, by_dtype, [s for p in peaks for s in p.samples])
    report["matmul_peak"] = {**peak.to_dict(), "other_load_during": peak_loads}
    for run in runs:  # MFU against the best peak seen in either measurement
        if run.pairs_per_s:
            run.mfu = run.pairs_per_s * flops[run.workload]["total"] / peak.peak
            run.mfu_own_precision = (run.pairs_per_s * flops[run.workload]["total"]
                                     / peak.by_dtype["bfloat16" if run.bf16 else "float32"])
    report["children_max_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    save()
    print()
    print(md_path.read_text())
    print(f"results: {json_path} and {md_path}")
    return report


if __name__ == "__main__":
    main()
