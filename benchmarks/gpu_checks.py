"""GPU checks of the memory savings, for a machine with a CUDA device (the CPU tests cover the same code paths).

On a small locally built Llama (nothing is downloaded), each configuration trains a few DPO steps through preftune
and reports: the device's name, that the step-0 loss is ln 2 (the reference equals the policy), that the loss
moved, where the quantized weights live, and the peak GPU memory (torch.cuda.max_memory_allocated). The
configurations: LoRA on a bf16 base (the baseline), QLoRA (nf4, and nf4 with nested quantization), QLoRA with
paged 8-bit AdamW states, and full fine-tuning with fp32 against 8-bit AdamW states.

    python benchmarks/gpu_checks.py                  # ≈1 min on one GPU; exit code 1 if a check fails
    python benchmarks/gpu_checks.py --out results.json

Needs torch with CUDA, bitsandbytes with its CUDA kernels, and preftune installed (pip install -e '.[quantization]').
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CONFIGS: dict[str, dict[str, Any]] = {
    "LoRA r=16, bf16 base, adamw": {"use_peft": True, "lora_r": 16, "dtype": "bfloat16"},
    "QLoRA nf4 r=16, adamw": {"use_peft": True, "lora_r": 16, "load_in_4bit": True},
    "QLoRA nf4+nested r=16, adamw": {"use_peft": True, "lora_r": 16, "load_in_4bit": True,
                                     "use_bnb_nested_quant": True},
    "QLoRA nf4+nested r=16, paged_adamw_8bit": {"use_peft": True, "lora_r": 16, "load_in_4bit": True,
                                                "use_bnb_nested_quant": True, "optim": "paged_adamw_8bit"},
    "int8 base r=16, adamw_8bit": {"use_peft": True, "lora_r": 16, "load_in_8bit": True, "optim": "adamw_8bit"},
    "full fine-tuning, adamw": {},
    "full fine-tuning, adamw_8bit": {"optim": "adamw_8bit"},
}

# A Llama of ≈143M parameters with a small vocabulary: big enough for the savings to show, quick to build.
MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=8, max_position_embeddings=1024)


def build_inputs(work: Path) -> tuple[Path, Path]:
    from preftune.data.builtin import builtin_preferences
    from preftune.modeling.tiny import build_tiny_model, default_tokenizer

    rows = builtin_preferences(64, seed=0)
    tokenizer = default_tokenizer(rows)
    model = build_tiny_model(tokenizer, arch="llama", seed=0, **MODEL)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    data = work / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return work / "model", data


def run(label: str, values: dict[str, Any], model: Path, data: Path, work: Path) -> dict[str, Any]:
    from preftune import train

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    config = {"model_name_or_path": str(model), "dataset": str(data), "max_steps": 4, "logging_steps": 1,
              "per_device_train_batch_size": 8, "learning_rate": 1e-4, "bf16": True, "disable_tqdm": True,
              "output_dir": str(work / label.replace(" ", "_").replace(",", "").replace("=", "")),
              "cache_dir": str(work / "cache"), **values}
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "seconds": round(seconds, 1),
            "first_loss": losses[0], "last_loss": losses[-1],
            "starts_at_ln2": abs(losses[0] - math.log(2)) < 2e-2,  # bf16: ln 2 to bf16's precision
            "loss_moved": losses[-1] != losses[0], "final": sorted(p.name for p in result.final_dir.iterdir())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU (the CPU tests cover the same code)")
        return 2
    import bitsandbytes

    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | bitsandbytes "
          f"{bitsandbytes.__version__}")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "bitsandbytes": bitsandbytes.__version__, "runs": {}}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = build_inputs(work)
        for label, values in CONFIGS.items():
            try:
                outcome = run(label, values, model, data, work)
            except Exception as err:  # report every configuration, then fail
                outcome = {"error": f"{type(err).__name__}: {err}"}
            results["runs"][label] = outcome
            ok = "error" not in outcome and outcome["starts_at_ln2"] and outcome["loss_moved"]
            failed |= not ok
            shown = (f"peak {outcome['peak_gib']:.2f} GiB, {outcome['seconds']} s, loss {outcome['first_loss']:.4f} → "
                     f"{outcome['last_loss']:.4f}" if "error" not in outcome else outcome["error"])
            print(f"{'ok  ' if ok else 'FAIL'} {label}: {shown}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
