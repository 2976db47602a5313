"""Facts about the FlexAttention path: the BlockMask skips exactly the blocks the boolean mask rules out, and
every layout gives the log-probs (and, where torch can differentiate FlexAttention, the gradients) of SDPA."""

from __future__ import annotations

import pytest
import torch
from test_logprobs import LAYOUTS, sample_pairs

from preftune.data.batching import PreferenceCollator
from preftune.modeling.logprobs import completion_logps, flex_block_mask, model_inputs

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention", reason="torch has no FlexAttention")
if not hasattr(torch.compiler, "set_stance"):
    pytest.skip("torch ≥ 2.6 (torch.compiler.set_stance) is needed to run FlexAttention uncompiled",
                allow_module_level=True)

ARCHS = ["llama", "qwen2"]  # GPT-2 has no FlexAttention in transformers
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def test_block_mask_skips_the_blocks_no_query_may_read():
    block = flex_attention._DEFAULT_SPARSE_BLOCK_SIZE

    def unit(prompt, completion):
        return {"prompt_ids": [5] * prompt, "chosen_ids": [6] * completion, "rejected_ids": [7] * completion}

    # One two-block unit (prompt, then both responses) fills row 0; two one-block units share row 1.
    rows = [unit(block, block // 2), unit(block // 2, block // 4), unit(block // 2, block // 4)]
    batch = PreferenceCollator(0, prefix_sharing=True, padding_free=True)(rows)
    assert batch["input_ids"].shape == (2, 2 * block)
    block_mask = flex_block_mask(batch["attention_mask"])
    # Row 0: the responses read the prompt block, nothing reads ahead. Row 1: neither unit reads the other.
    assert block_mask.to_dense().tolist() == [[[[1, 0], [1, 1]]], [[[1, 0], [0, 1]]]]
    q, kv = torch.meshgrid(torch.arange(2 * block), torch.arange(2 * block), indexing="ij")
    for r in range(2):
        row = torch.full_like(q, r)
        assert torch.equal(block_mask.mask_mod(row, torch.zeros_like(q), q, kv), batch["attention_mask"][r, 0])


def logps_and_grads(model, batch, impl, weights, with_grad):
    model.set_attn_implementation(impl)
    with torch.set_grad_enabled(with_grad):
        logps = completion_logps(model, **model_inputs(batch), chunk_size=3)["logps"]
    if not with_grad:
        return logps, {}
    (logps * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return logps.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["padded", "shared", "packed", "shared+packed"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_flex_attention_gives_the_log_probs_and_gradients_of_sdpa(tiny_model, arch, layout, device):
    """fp32 on both paths. On CPU torch refuses FlexAttention's backward, so only log-probs are compared, and
    FlexAttention runs uncompiled (``force_eager``: its unfused reference implementation, no 20 s compile);
    on CUDA it runs compiled, as in training, and gradients are compared too."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rows = sample_pairs(1)
    batch = {k: v.to(device) for k, v in PreferenceCollator(0, prefix_sharing=layout[0],
                                                            padding_free=layout[1])(rows).items()}
    weights = torch.linspace(-1.0, 2.0, 2 * len(rows), device=device)
    model = tiny_model(arch).to(device)
    with_grad = device != "cpu"

    expected, expected_grads = logps_and_grads(model, batch, "sdpa", weights, with_grad)
    stance = torch.compiler.set_stance("force_eager" if device == "cpu" else "default")
    with stance:
        got, grads = logps_and_grads(model, batch, "flex_attention", weights, with_grad)

    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_training_with_flex_attention_on_cpu_is_refused_up_front(tmp_path, tiny_model, tokenizer):
    """torch has no FlexAttention backward on CPU: the run stops before any work, with the way out."""
    from preftune import train
    from preftune.config import ConfigError
    from preftune.data.builtin import builtin_preferences

    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU-only machines")
    rows = builtin_preferences(8, seed=0)
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="flex_attention trains on GPUs only.*attn_implementation=sdpa"):
        train(dict(output_dir=str(tmp_path / "run"), max_steps=1, disable_tqdm=True), model=model,
              tokenizer=tokenizer, train_dataset=rows)
