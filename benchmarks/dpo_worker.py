"""One benchmark run in its own process: ``python dpo_worker.py SPEC.json``.

The spec names the tool (``preftune`` or ``trl``), the model folder, the jsonl, the step counts and the
tool-specific settings; the worker trains, then writes ``result.json`` beside the spec with the wall time of
every optimizer step, the first logged loss and log-probs, and the process's peak RSS (``VmHWM``).

Step times are measured the same way for both tools: the wall time between the ends of consecutive optimizer
steps (so data loading and logging are inside the step).

* preftune: ``metrics.jsonl`` with ``logging_steps=1`` holds ``pairs_per_second`` over the interval since the
  previous log, so the step time is ``pairs / pairs_per_second``.
* TRL: a :class:`transformers.TrainerCallback` stamps ``on_step_begin`` / ``on_step_end``; the step time is
  the interval between consecutive ``on_step_end`` (the first step: ``on_step_begin`` → ``on_step_end``). The
  ``on_step_begin`` → ``on_step_end`` times (compute only) are kept as well.

At every step boundary the worker also samples ``/proc/stat`` and its own CPU time, so the CPU used by *other*
processes during each step is known (``step_other_load``, in cores): on a shared machine a contended step shows.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

BETA = 0.1
LEARNING_RATE = 1e-6
PAIRS_PER_STEP = 4
MAX_LENGTH = 1024


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_sample() -> tuple[float, float, float]:
    """(wall clock, machine busy CPU seconds, this process's CPU seconds) at one instant."""
    return time.perf_counter(), machine_busy_seconds(), time.process_time()


def other_load(samples: list[tuple[float, float, float]]) -> list[float]:
    """Cores kept busy by *other* processes between consecutive samples (one value per interval)."""
    loads = []
    for (t0, busy0, own0), (t1, busy1, own1) in zip(samples, samples[1:]):
        loads.append(max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9)))
    return loads


def source_digest(package: str) -> str | None:
    """A short hash of a package's ``.py`` files, to tell whether runs used the same code."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    digest = hashlib.sha256()
    for root in spec.submodule_search_locations:
        for path in sorted(Path(root).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (``VmHWM`` in ``/proc/self/status``), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_preftune(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train with preftune's public ``train`` and read per-step throughput back from ``metrics.jsonl``."""
    import yaml

    from preftune import train
    from preftune.config import FIELDS

    total = spec["warmup"] + spec["steps"]
    config: dict[str, Any] = {
        "model_name_or_path": spec["model_dir"],
        "dataset": spec["data_path"],
        "output_dir": str(out_dir / "run"),
        "overwrite_output_dir": True,
        "cache_dir": str(out_dir / "preftune-cache"),
        "method": "dpo",
        "beta": BETA,
        "learning_rate": LEARNING_RATE,
        "optim": "adamw",
        "per_device_train_batch_size": PAIRS_PER_STEP,
        "gradient_accumulation_steps": 1,
        "max_length": MAX_LENGTH,
        "max_steps": total,
        "seed": spec["seed"],
        "disable_dropout": True,
        "logging_steps": 1,
        "disable_tqdm": True,
        "report_to": [],
    }
    for key, value in spec["settings"].items():
        if key not in FIELDS:
            raise KeyError(f"preftune's TrainConfig has no field {key!r}")
        config[key] = value

    # Stamp every metrics record (one per optimizer step) to attribute other processes' CPU use to each step.
    from preftune.training import tracking

    samples = [cpu_sample()]
    write = getattr(getattr(tracking, "MetricsLog", None), "write", None)

    def stamped_write(self, record: dict) -> None:
        if "pairs_per_second" in record:
            samples.append(cpu_sample())
        write(self, record)

    if write is not None:  # without the hook the run still works, only the per-step load is unknown
        tracking.MetricsLog.write = stamped_write
    try:
        result = train(config)
    finally:
        if write is not None:
            tracking.MetricsLog.write = write

    records = [json.loads(line) for line in (Path(config["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    resolved = yaml.safe_load((Path(config["output_dir"]) / "config.yaml").read_text())  # bf16 as preftune chose
    records = [r for r in records if "pairs_per_second" in r]
    step_seconds = [PAIRS_PER_STEP / r["pairs_per_second"] for r in records]
    first = records[0] if records else {}
    return {
        "step_seconds": step_seconds,
        "compute_seconds": None,
        "first_loss": first.get("loss", result.first_loss),
        "first_logps_chosen": first.get("logps/chosen"),
        "first_logps_rejected": first.get("logps/rejected"),
        "steps_done": result.global_step,
        "step_other_load": other_load(samples) if len(samples) == len(step_seconds) + 1 else None,
        "hook_step_seconds": [t1[0] - t0[0] for t0, t1 in zip(samples, samples[1:])],
        "effective": {k: resolved.get(k, FIELDS[k].default) for k in
                      ("bf16", "dtype", "gradient_checkpointing", "precompute_ref_log_probs", "attn_implementation",
                       "logprob_chunk_size", "prefix_sharing", "padding_free") if k in FIELDS},
    }


def run_trl(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train with TRL's ``DPOTrainer`` (model loaded from the folder by TRL itself) and a timing callback."""
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begins: list[float] = []
            self.ends: list[float] = []
            self.samples: list[tuple[float, float, float]] = []
            self.logs: list[dict[str, float]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())
            if not self.samples:
                self.samples.append(cpu_sample())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.samples.append(cpu_sample())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.logs.append(dict(logs))

    total = spec["warmup"] + spec["steps"]
    # Only the knobs under test are set; everything else stays at TRL's DPOConfig defaults (bf16 and
    # gradient checkpointing included, unless the config overrides them). use_cpu is needed on a CPU-only machine.
    import torch

    args = DPOConfig(
        output_dir=str(out_dir / "run"),
        use_cpu=not torch.cuda.is_available(),
        beta=BETA,
        learning_rate=LEARNING_RATE,
        per_device_train_batch_size=PAIRS_PER_STEP,
        gradient_accumulation_steps=1,
        max_length=MAX_LENGTH,
        max_steps=total,
        seed=spec["seed"],
        disable_dropout=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **spec["settings"],
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    data = datasets.load_dataset("json", data_files=spec["data_path"], split="train")
    timer = StepTimer()
    trainer = DPOTrainer(model=spec["model_dir"], args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[timer])
    trainer.train()

    starts = timer.begins[:1] + timer.ends[:-1]
    step_seconds = [end - start for start, end in zip(starts, timer.ends)]
    compute_seconds = [end - begin for begin, end in zip(timer.begins, timer.ends)]
    first = next((log for log in timer.logs if "loss" in log), {})
    return {
        "step_seconds": step_seconds,
        "compute_seconds": compute_seconds,
        "first_loss": first.get("loss"),
        "first_logps_chosen": first.get("logps/chosen"),
        "first_logps_rejected": first.get("logps/rejected"),
        "steps_done": trainer.state.global_step,
        "step_other_load": other_load(timer.samples),
        "effective": {
            "bf16": args.bf16,
            "gradient_checkpointing": args.gradient_checkpointing,
            "precompute_ref_log_probs": args.precompute_ref_log_probs,
            "optim": str(args.optim),
            "model_dtype": str(trainer.model.dtype),
            "attn_implementation": trainer.model.config._attn_implementation,
            "reference_model_loaded": trainer.ref_model is not None,
        },
    }


RUNNERS = {"preftune": run_preftune, "trl": run_trl}


def main(spec_path: str) -> None:
    spec_file = Path(spec_path)
    spec = json.loads(spec_file.read_text())
    out_dir = spec_file.parent
    started = time.perf_counter()
    result: dict[str, Any] = {"status": "ok"}
    source = source_digest(spec["tool"])  # before the run: the code that is about to be imported
    try:
        result.update(RUNNERS[spec["tool"]](spec, out_dir))
    except Exception as e:  # the parent reports the failure and goes on with the other runs
        import traceback

        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    result["wall_seconds"] = time.perf_counter() - started
    result["source_digest"] = source
    result["vm_hwm_bytes"] = peak_rss_bytes()
    result["pid"] = os.getpid()
    import torch

    result["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():  # the whole run's peak device memory, and the card it was measured on
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        result["device"] = torch.cuda.get_device_name(0)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    sys.exit(0 if result["status"] == "ok" else 1)


if __name__ == "__main__":
    main(sys.argv[1])
