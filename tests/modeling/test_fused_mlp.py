"""Facts about the fused gated MLP: same values and gradients, two fewer saved activations, applied only where safe."""

from __future__ import annotations

import pytest
import torch
from test_logprobs import sample_pairs

from preftune.data.batching import PreferenceCollator
from preftune.modeling.fused_mlp import fuse_gated_mlps
from preftune.modeling.logprobs import completion_logps, model_inputs


def logps_and_grads(model, batch):
    out = completion_logps(model, **model_inputs(batch), chunk_size=4)["logps"]
    weights = torch.linspace(-1.0, 2.0, out.shape[0], dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fused_mlp_gives_the_same_log_probs_and_gradients(tiny_model, arch):
    batch = PreferenceCollator(0, prefix_sharing=True, padding_free=True)(sample_pairs(2))
    expected, expected_grads = logps_and_grads(tiny_model(arch).double(), batch)
    fused = tiny_model(arch).double()
    assert fuse_gated_mlps(fused) == fused.config.num_hidden_layers
    got, grads = logps_and_grads(fused, batch)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_under_bf16_autocast_the_fused_mlp_matches_the_plain_one(tiny_model):
    batch = PreferenceCollator(0, prefix_sharing=True, padding_free=True)(sample_pairs(3))
    results = []
    for fuse in (False, True):
        model = tiny_model("llama")
        if fuse:
            fuse_gated_mlps(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(logps_and_grads(model, batch))
    (expected, expected_grads), (got, grads) = results
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # the same bf16 operations in the same order
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-2, atol=1e-2 * expected_grads[name].abs().max())


def saved_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_logps(model, **model_inputs(batch), chunk_size=4)
    return sum(storages.values())


def test_each_fused_layer_keeps_two_fewer_intermediate_activations(tiny_model):
    batch = PreferenceCollator(0, prefix_sharing=True, padding_free=False)(sample_pairs(4))
    plain, fused = tiny_model("llama"), tiny_model("llama")
    layers = fuse_gated_mlps(fused)
    tokens = batch["input_ids"].numel()
    one_activation = tokens * fused.config.intermediate_size * 4  # fp32 [tokens, intermediate]
    assert saved_bytes(plain, batch) - saved_bytes(fused, batch) == 2 * layers * one_activation


def test_only_plain_gated_mlps_are_changed(tiny_model):
    from peft import LoraConfig, get_peft_model

    assert fuse_gated_mlps(tiny_model("gpt2")) == 0  # no gate: a different MLP
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["down_proj"]))
    assert fuse_gated_mlps(lora) == 0  # down_proj is a LoRA layer with its own forward
    hooked = tiny_model("llama")
    hooked.model.layers[0].mlp.down_proj.register_forward_hook(lambda *args: None)
    assert fuse_gated_mlps(hooked) == 1  # the hooked layer keeps its forward, the other is fused
