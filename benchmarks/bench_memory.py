"""What each memory saving saves on the benchmark model (the 58M Llama of dpo_assets.py): weight bytes of a 16-bit,
8-bit and 4-bit base (QLoRA), and optimizer-state bytes of fp32 AdamW against 8-bit and paged AdamW, for full
fine-tuning and for LoRA adapters. Counted exactly, tensor by tensor, on the objects preftune builds
(``modeling.loading.load_causal_lm``, ``training.loop.build_optimizer``): weights are parameters + buffers +
bitsandbytes' quantization state; optimizer states are every tensor in ``optimizer.state`` after one step.

``--measure-step`` also trains 3 DPO steps per configuration in a fresh process on workload (a) and reports the
peak memory of steps 2–3, when the optimizer states exist and loading is over (CPU: the peak RSS after freed heap is
returned to the system at the end of step 1; CUDA: torch.cuda.max_memory_allocated from the end of step 1).

    python benchmarks/bench_memory.py                 # counts (≈1 min on 2 cores; needs bitsandbytes)
    python benchmarks/bench_memory.py --measure-step  # and measured DPO steps per configuration (≈10 min)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo_assets  # noqa: E402

GiB = 2**30
MiB = 2**20


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quant_state_bytes(module: torch.nn.Module) -> int:
    """bitsandbytes' per-layer quantization state beside the packed weight: 4-bit absmax scales and codebook (and
    the nested ones), or LLM.int8's per-row scales."""
    total = 0
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    while state is not None:
        total += sum(tensor_bytes(t) for t in (state.absmax, state.code) if isinstance(t, torch.Tensor))
        if getattr(state, "offset", None) is not None:
            total += tensor_bytes(state.offset)
        state = getattr(state, "state2", None)
    scb = getattr(getattr(module, "weight", None), "SCB", None)
    if isinstance(scb, torch.Tensor):
        total += tensor_bytes(scb)
    return total


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the whole model and of its decoder linear layers (what bitsandbytes quantizes)."""
    linear = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head") or not hasattr(module, "weight") or module.weight is None:
            continue
        if isinstance(module, torch.nn.Linear):  # bnb's Linear4bit / Linear8bitLt are Linear subclasses
            linear += tensor_bytes(module.weight) + quant_state_bytes(module)
            if module.bias is not None:
                linear += tensor_bytes(module.bias)
    params = sum(tensor_bytes(p) for p in model.parameters())
    buffers = sum(tensor_bytes(b) for b in model.buffers())
    extra = sum(quant_state_bytes(m) for m in model.modules())
    return {"total": params + buffers + extra, "linear_layers": linear}


def optimizer_state_bytes(model: torch.nn.Module, optim: str) -> dict[str, float]:
    """Optimizer-state bytes after one step over ``model``'s trainable parameters (random gradients)."""
    from preftune.config import build_config
    from preftune.training.loop import build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(build_config({"optim": optim, "learning_rate": 1e-6}), model)
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) * 1e-3
    optimizer.step()
    state = sum(tensor_bytes(t) for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    for p in params:
        p.grad = None
    trainable = sum(p.numel() for p in params)
    return {"bytes": state, "trainable_parameters": trainable, "bytes_per_parameter": state / trainable}


def build_base(work: Path) -> Path:
    """The benchmark model's architecture with random weights, saved (quantization happens as a model loads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = work / "bench-model"
    if not (path / "config.json").exists():
        config = AutoConfig.for_model("llama", vocab_size=dpo_assets.VOCAB_SIZE, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0, **dpo_assets.MODEL_CONFIG)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def count(work: Path) -> dict[str, Any]:
    from preftune.config import build_config
    from preftune.modeling.loading import add_lora, load_causal_lm

    base = build_base(work)
    weights = {}
    for label, values in [("fp32", {}), ("bf16", {"dtype": "bfloat16"}),
                          ("int8 (load_in_8bit)", {"load_in_8bit": True, "use_peft": True}),
                          ("nf4 (load_in_4bit)", {"load_in_4bit": True, "use_peft": True}),
                          ("nf4 + nested (use_bnb_nested_quant)", {"load_in_4bit": True, "use_peft": True,
                                                                   "use_bnb_nested_quant": True})]:
        model = load_causal_lm(str(base), build_config(values))
        weights[label] = weight_bytes(model)
        del model
    states = {}
    full = load_causal_lm(str(base), build_config({}))
    for optim in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
        states[f"full fine-tuning, {optim}"] = optimizer_state_bytes(full, optim)
    lora = add_lora(full, build_config({"use_peft": True, "lora_r": 16}))
    for optim in ("adamw", "adamw_8bit"):
        states[f"LoRA r=16 all-linear, {optim}"] = optimizer_state_bytes(lora, optim)
    parameters = sum(p.numel() for p in load_causal_lm(str(base), build_config({})).parameters())
    return {"parameters": parameters, "weights": weights, "optimizer_states": states}


STEP_CONFIGS = {
    "full fine-tuning, adamw": {},
    "full fine-tuning, adamw_8bit": {"optim": "adamw_8bit"},
    "LoRA r=16, adamw": {"use_peft": True, "lora_r": 16},
    "QLoRA nf4 r=16, adamw": {"use_peft": True, "lora_r": 16, "load_in_4bit": True},
    "QLoRA nf4 + nested r=16, paged_adamw_8bit": {"use_peft": True, "lora_r": 16, "load_in_4bit": True,
                                                  "use_bnb_nested_quant": True, "optim": "paged_adamw_8bit"},
}

_STEP = r"""
import ctypes, json, sys, torch
from preftune import train

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

settled = {}

def after_step(step, model):
    # From the end of step 1 (optimizer states allocated, loading and the reference pass over), track the peak.
    if step != 1:
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        settled["bytes"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS counts live memory
    settled["bytes"] = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS

train(json.loads(sys.argv[1]), callbacks=[after_step])
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else status("VmHWM:")
print("PEAK", peak, settled["bytes"])
"""


def measure_steps(work: Path) -> dict[str, Any]:
    """3 DPO steps (4 pairs each, workload a, precomputed reference, fp32 weights) per configuration, each in a
    fresh process: the memory held after step 1 and the peak over steps 2–3."""
    assets = dpo_assets.ensure_model(work)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    data, _ = dpo_assets.ensure_dataset(assets, tokenizer, dpo_assets.WORKLOADS["a"], 12)
    results = {}
    for label, values in STEP_CONFIGS.items():
        with tempfile.TemporaryDirectory() as out:
            config = {"model_name_or_path": str(assets.model_dir), "dataset": str(data), "max_steps": 3,
                      "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "bf16": False,
                      "learning_rate": 1e-6, "output_dir": f"{out}/run", "cache_dir": f"{out}/cache",
                      "disable_tqdm": True, "save_steps": None, **values}
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", _STEP, json.dumps(config)], capture_output=True, text=True)
            if done.returncode != 0:
                results[label] = {"error": done.stderr[-2000:]}
                continue
            peak, settled = (int(x) for x in next(line.split()[1:] for line in done.stdout.splitlines()
                                                    if line.startswith("PEAK")))
            results[label] = {"peak_bytes": peak, "after_step_1_bytes": settled,
                              "seconds": round(time.perf_counter() - started, 1)}
    return results


def render(report: dict[str, Any]) -> str:
    lines = [f"# Memory of each saving on the benchmark model ({report['parameters'] / 1e6:.1f}M parameters)", "",
             f"{report['machine']}; torch {report['versions']['torch']}, bitsandbytes "
             f"{report['versions']['bitsandbytes']}.", "", "## Weights", "",
             "| base weights | whole model | decoder linear layers (what bitsandbytes quantizes) |", "|---|---:|---:|"]
    full = report["weights"]["fp32"]
    for label, w in report["weights"].items():
        lines.append(f"| {label} | {w['total'] / MiB:.1f} MiB ({w['total'] / full['total']:.0%}) | "
                     f"{w['linear_layers'] / MiB:.1f} MiB ({w['linear_layers'] / full['linear_layers']:.0%}) |")
    lines += ["", "The embeddings and the LM head (2 × 32,000 × 512 = 32.8M of the 57.9M parameters) stay "
              "unquantized, as transformers keeps them.", "", "## Optimizer states (after one step)", "",
              "| configuration | trainable parameters | state | bytes per trainable parameter |",
              "|---|---:|---:|---:|"]
    for label, s in report["optimizer_states"].items():
        lines.append(f"| {label} | {s['trainable_parameters'] / 1e6:.2f}M | {s['bytes'] / MiB:.1f} MiB | "
                     f"{s['bytes_per_parameter']:.2f} |")
    if report.get("steps"):
        lines += ["", "## DPO steps 2–3 (workload a, 4 pairs a step, fp32 weights)", "",
                  "| configuration | held after step 1 | peak over steps 2–3 | time (3 steps, with loading) |",
                  "|---|---:|---:|---:|"]
        for label, r in report["steps"].items():
            cell = (f"{r['after_step_1_bytes'] / GiB:.2f} GiB | {r['peak_bytes'] / GiB:.2f} GiB | {r['seconds']} s"
                    if "peak_bytes" in r else "failed | — | —")
            lines.append(f"| {label} | {cell} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure-step", action="store_true", help="also one measured DPO step per configuration")
    parser.add_argument("--work-dir", default=str(Path(__file__).resolve().parent / ".work"))
    parser.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    import importlib.metadata
    import platform

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
              "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "bitsandbytes")},
              **count(work)}
    if args.measure_step:
        report["steps"] = measure_steps(work)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"memory-{stamp}.json").write_text(json.dumps(report, indent=2))
    text = render(report)
    (results / f"memory-{stamp}.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
