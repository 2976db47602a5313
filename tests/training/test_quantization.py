"""Lighter training of big models: QLoRA (LoRA adapters on a 4-bit base, through transformers' BitsAndBytesConfig)
and 8-bit / paged optimizer states, on bitsandbytes' CPU backend. Skipped, with the reason, where bitsandbytes is not
installed or has no backend for this machine; benchmarks/gpu_checks.py runs the same on a GPU."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from preftune import train
from preftune.config import build_config
from preftune.data.builtin import builtin_preferences
from preftune.errors import ConfigError
from preftune.modeling.tiny import build_tiny_model, default_tokenizer
from preftune.training.loop import build_optimizer


def _bitsandbytes_on_cpu() -> str | None:
    """None when bitsandbytes' 8-bit optimizer runs on this CPU, else why not."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        p = torch.nn.Parameter(torch.ones(4096))
        p.grad = torch.ones(4096)
        bnb.optim.AdamW8bit([p]).step()
    except Exception as err:  # no CPU kernels in this build or for this processor
        return f"bitsandbytes has no CPU backend here ({type(err).__name__}: {err})"
    return None


SKIP = _bitsandbytes_on_cpu()
needs_bnb = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
ROWS = builtin_preferences(32, seed=5)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(ROWS)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    """A tiny Llama saved as a checkpoint folder: quantization happens as a model loads from disk."""
    path = tmp_path_factory.mktemp("base") / "model"
    build_tiny_model(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(tmp_path, name, base, **overrides):
    config = dict(model_name_or_path=str(base), output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"),
                  max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                  disable_tqdm=True, seed=0, bf16=False) | overrides
    return train(config, train_dataset=ROWS)


def metrics(result):
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


# ---- QLoRA ---------------------------------------------------------------------------------------------------


@needs_bnb
def test_4bit_loading_quantizes_the_linear_layers_only(base):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from preftune.modeling.loading import load_causal_lm

    full = AutoModelForCausalLM.from_pretrained(base)
    quantized = load_causal_lm(str(base), build_config({"load_in_4bit": True, "use_peft": True}))
    linears = {n: m for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values())
    for name, module in linears.items():  # two 4-bit codes per byte
        assert module.weight.dtype == torch.uint8
        assert module.weight.numel() * 2 == full.get_submodule(name).weight.numel()
    assert quantized.lm_head.weight.dtype == torch.float32  # the head and embeddings stay unquantized
    # Each weight is rounded to the nearest of NF4's 16 levels in [-1, 1], scaled by its block's absmax (blocks of
    # 64): the error is at most half the widest gap between levels (-1 → -0.6962) times that absmax.
    for name, module in linears.items():
        weight = full.get_submodule(name).weight.detach()
        restored = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).reshape(weight.shape)
        absmax = weight.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        error = (restored - weight).reshape(-1, 64).abs()
        assert (error <= 0.5 * (1 - 0.6962) * absmax + 1e-6).all(), name
        assert (error > 0).any()  # and it did round
    nested = load_causal_lm(str(base), build_config({"load_in_4bit": True, "use_bnb_nested_quant": True,
                                                     "use_peft": True}))
    assert quantized.get_memory_footprint() < full.get_memory_footprint()
    # Double quantization stores the blocks' absmax scales in 8 bits (with fp32 scales of their own) instead of fp32.
    name = next(iter(linears))
    plain_state, nested_state = linears[name].weight.quant_state, nested.get_submodule(name).weight.quant_state
    assert plain_state.absmax.dtype == torch.float32 and not plain_state.nested
    assert nested_state.absmax.dtype == torch.uint8 and nested_state.nested


@needs_bnb
def test_qlora_starts_at_ln2_and_trains_only_the_adapters(tmp_path, base):
    result = run(tmp_path, "qlora", base, use_peft=True, lora_r=4, load_in_4bit=True, use_bnb_nested_quant=True)
    first = metrics(result)[0]
    # The reference is the same 4-bit base with the adapters off: the policy equals it at step 0.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics(result)[-1]["loss"] < first["loss"]
    adapter = load_file(result.final_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    assert json.loads((result.final_dir / "adapter_config.json").read_text())["r"] == 4


@needs_bnb
def test_8bit_base_trains_adapters(tmp_path, base):
    result = run(tmp_path, "int8", base, use_peft=True, lora_r=4, load_in_8bit=True, max_steps=1)
    # LLM.int8 casts activations to fp16 and picks its fp16 "outlier" columns per batch, so the precomputed
    # reference (other batches) and the policy differ in the fourth digit, not more.
    assert metrics(result)[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert (result.final_dir / "adapter_model.safetensors").exists()


def test_a_quantized_base_needs_lora_and_a_model_path(tmp_path):
    with pytest.raises(ConfigError, match="set use_peft: true"):
        build_config({"load_in_4bit": True})
    with pytest.raises(ConfigError, match="exclusive"):
        build_config({"load_in_4bit": True, "load_in_8bit": True, "use_peft": True})
    with pytest.raises(ConfigError, match="apply to a 4-bit base"):
        build_config({"bnb_4bit_quant_type": "fp4"})
    if SKIP is None:
        with pytest.raises(ConfigError, match="rounded weights"):
            build_config({"load_in_4bit": True, "use_peft": True, "save_merged_model": True})
        with pytest.raises(ConfigError, match="give model_name_or_path"):  # the embedded model is built in memory
            train({"load_in_4bit": True, "use_peft": True, "output_dir": str(tmp_path / "x"), "max_steps": 1,
                   "cache_dir": str(tmp_path / "cache"), "disable_tqdm": True})


# ---- 8-bit and paged optimizer states ------------------------------------------------------------------------


def _one_step(tok, optim: str, seed: int = 0):
    """One AdamW step on the tiny model from the same gradients; the model and its optimizer."""
    model = build_tiny_model(tok, seed=seed).train()
    optimizer = build_optimizer(build_config({"optim": optim, "learning_rate": 1e-3}), model)
    ids = torch.tensor([tok(" ".join(r["prompt"] + r["chosen"] for r in ROWS[:2]))["input_ids"]])
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


@needs_bnb
def test_8bit_adamw_keeps_each_moment_in_one_byte(tok):
    model, optimizer = _one_step(tok, "adamw_8bit")
    large = [p for p in model.parameters() if p.numel() >= 4096]
    assert large
    state_bytes = 0
    for p in large:
        state = optimizer.state[p]
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8
        assert state["state1"].numel() == state["state2"].numel() == p.numel()
        state_bytes += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t)
                           and t.numel() > 256)  # m, v and their per-block scales (the 256-entry codebooks aside)
    per_parameter = state_bytes / sum(p.numel() for p in large)
    assert 2.0 <= per_parameter <= 2.07  # against 8 bytes for fp32 AdamW: 2 codes + 2 fp32 scales per 256 values


@needs_bnb
def test_8bit_adamw_step_follows_fp32_adamw(tok):
    start = build_tiny_model(tok, seed=0).state_dict()
    exact, _ = _one_step(tok, "adamw")
    for optim in ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit"):
        approx, _ = _one_step(tok, optim)
        for name, p in exact.named_parameters():
            step, step8 = p.detach() - start[name], approx.get_parameter(name).detach() - start[name]
            # Quantized moments change each update by a few percent, never its direction.
            assert (step8 - step).norm() <= 0.05 * step.norm() + 1e-12, (optim, name)


@needs_bnb
def test_resume_with_8bit_optimizer_states_equals_the_uninterrupted_run(tmp_path, base):
    # lora_dropout=0: LoRA's dropout draws random masks, and a resumed LoRA run with dropout differs from the
    # uninterrupted one whatever the optimizer (an issue of its own, reported).
    common = dict(use_peft=True, lora_r=4, lora_dropout=0.0, load_in_4bit=True, optim="adamw_8bit", max_steps=4,
                  save_steps=2)
    whole = run(tmp_path, "whole", base, **common)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(whole.output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run(tmp_path, "resumed", base, resume_from_checkpoint=True, **common)
    a = load_file(whole.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_optimizers_by_transformers_names():
    assert build_config({"optim": "adamw_torch"}).optim == "adamw_torch"
    with pytest.raises(ConfigError, match="'adafactor' is not supported here.*Supported: adamw"):
        build_config({"optim": "adafactor"})
    if SKIP is not None:
        with pytest.raises(ConfigError, match="needs bitsandbytes: pip install bitsandbytes"):
            build_config({"optim": "adamw_8bit"})


def test_torchao_low_bit_adamw_on_cpu():
    pytest.importorskip("torchao.optim", reason="torchao is not installed (pip install torchao)")
    for optim, bits in (("adamw_torch_8bit", 8), ("adamw_torch_4bit", 4)):
        layer = torch.nn.Linear(256, 256, bias=False)  # torchao keeps fp32 states for tensors under 4096 values
        optimizer = build_optimizer(build_config({"optim": optim, "learning_rate": 1e-3}), layer)
        layer(torch.ones(2, 256)).sum().backward()
        optimizer.step()
        state = optimizer.state[layer.weight]["exp_avg"]
        assert type(optimizer).__module__.startswith("torchao") and f"{bits}bit" in type(state).__name__
