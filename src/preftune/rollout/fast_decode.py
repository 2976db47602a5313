"""Decoding steps of a Llama-family causal LM (Llama, Qwen2, Mistral without a reachable sliding window) run
directly on the model's own weights, with a preallocated KV cache and the attention written out for one query position.

Why: at the sizes the online methods sample from on a CPU, one decoding step of Hugging Face's forward spends a
large share of its time outside the arithmetic (per-step mask creation, ``DynamicCache``'s ``torch.cat`` of every
layer's keys and values, module dispatch, output dataclasses). :class:`LlamaDecoder` computes the same function
of the same weights for one new token per row:

    h = E[y]                                                  (embedding of the token just sampled)
    per layer:  a = RMSNorm₁(h);  q, k, v = a·W_qᵀ (+b_q), a·W_kᵀ (+b_k), a·W_vᵀ (+b_v)
                q, k = RoPE(q, pos), RoPE(k, pos)             (the model's own rotary module: any rope_scaling)
                K[:, :, t], V[:, :, t] = k, v                 (write into the preallocated cache)
                h = h + softmax(q·K[:, :, :t+1]ᵀ·s + bias)·V[:, :, :t+1] · W_oᵀ (+b_o)      (GQA: q heads grouped)
                h = h + W_down(act(W_gate·b) ⊙ W_up·b),  b = RMSNorm₂(h)
    logits = RMSNorm_f(h) · W_lmᵀ (+b_lm)                     (tied embeddings: W_lm is E)

The RMSNorms, the rotary embedding and the activation are the model's own modules (their ``forward``), so
``rms_norm_eps``, ``rope_scaling``, ``hidden_act``, ``head_dim``, ``attention_bias`` / ``mlp_bias`` (Qwen2's q/k/v
bias) and ``tie_word_embeddings`` are the checkpoint's. tests/rollout/test_fast_decode.py checks the logits against
the Hugging Face forward (max abs diff ≤ 1e-5 in fp32, left-padded prompts, llama / qwen2 / mistral) and the
seeded samples against the plain loop.

The prompt itself is prefilled by the Hugging Face forward (one call per batch); :meth:`LlamaDecoder.__init__`
copies that cache into its buffers. Anything :func:`supports` refuses (other architectures, sliding windows that
the sequence could reach, wrapped or quantized linear layers, modules with hooks) keeps the Hugging Face path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# Per layer, the submodules the step reads weights from; each must be exactly nn.Linear (no LoRA, no quantization).
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _has_hooks(module: nn.Module) -> bool:
    """Whether any submodule has forward hooks or an accelerate hook (offloading, device maps): the step calls
    weights and ``forward`` methods directly, so it would bypass them."""
    return any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in module.modules())


def supports(lm: nn.Module, total_length: int) -> bool:
    """Whether :class:`LlamaDecoder` computes ``lm``'s forward for sequences up to ``total_length`` tokens:
    a Llama / Qwen2 / Mistral causal LM with plain ``nn.Linear`` / ``nn.Embedding`` weights, no hooks, every
    layer full attention (a Mistral or Qwen2 sliding window only when the sequence cannot reach it)."""
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    base = getattr(lm, "model", None)
    if base is None or type(getattr(base, "embed_tokens", None)) is not nn.Embedding:
        return False
    if type(getattr(lm, "lm_head", None)) is not nn.Linear or not hasattr(base, "rotary_emb"):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and total_length > window:
        return False
    for layer in base.layers:
        for name in _LINEARS:
            if type(layer.get_submodule(name)) is not nn.Linear:
                return False
        if set(dict(layer.self_attn.named_children())) != {"q_proj", "k_proj", "v_proj", "o_proj"}:
            return False  # e.g. q/k norms of later families: not this computation
    return not _has_hooks(lm)


class LlamaDecoder:
    """One-token decoding steps for ``rows`` sequences whose prompts (left-padded to width ``W``) are already in a
    Hugging Face ``DynamicCache`` (keys and values ``[rows, kv_heads, W, head_dim]`` per layer, RoPE applied).

    The keys and values are copied into buffers ``[rows, kv_heads, W + max_new_tokens, head_dim]`` per layer;
    ``bias [rows, 1, 1, W + max_new_tokens]`` is the additive attention mask: −inf on the prompt's left padding,
    0 on every other position (every generated position is attended, finished rows included, as in ``generate``).
    """

    def __init__(self, lm: nn.Module, cache, attention_mask: Tensor, max_new_tokens: int):
        base = lm.model
        self.lm = lm
        self.base = base
        rows, width = attention_mask.shape
        self.rows = rows
        self.length = width  # positions filled in the buffers
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        for index in range(len(base.layers)):
            keys, values = _layer_cache(cache, index)
            shape = (rows, keys.shape[1], width + max_new_tokens, keys.shape[3])
            k = keys.new_empty(shape)
            v = values.new_empty(shape)
            k[:, :, :width] = keys
            v[:, :, :width] = values
            self.keys.append(k)
            self.values.append(v)
        # Additive attention mask [rows, 1, 1, W + max_new_tokens]: −inf on the prompt's left padding, 0 elsewhere.
        self.bias = torch.zeros((rows, 1, 1, width + max_new_tokens), dtype=keys.dtype, device=attention_mask.device)
        self.bias[:, 0, 0, :width].masked_fill_(attention_mask == 0, float("-inf"))
        attn = base.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = self.keys[0].shape[1]
        self.heads = attn.q_proj.out_features // self.head_dim
        self.scaling = attn.scaling

    def step(self, token: Tensor, position: Tensor) -> Tensor:
        """Logits ``[rows, V]`` (model dtype) of the next token after ``token [rows]`` at ``position [rows, 1]``."""
        base, rows, hd, t = self.base, self.rows, self.head_dim, self.length
        groups = self.heads // self.kv_heads
        hidden = F.embedding(token, base.embed_tokens.weight)  # [rows, H]
        cos, sin = base.rotary_emb(hidden[:, None], position)  # [rows, 1, hd]: broadcast over the heads
        bias = self.bias[:, :, :, : t + 1]
        for layer, keys, values in zip(base.layers, self.keys, self.values):
            attn, mlp = layer.self_attn, layer.mlp
            a = layer.input_layernorm.forward(hidden)
            q = _linear(a, attn.q_proj).reshape(rows, self.heads, hd)
            k = _linear(a, attn.k_proj).reshape(rows, self.kv_heads, hd)
            keys[:, :, t] = k * cos + _rotate_half(k) * sin
            values[:, :, t] = _linear(a, attn.v_proj).reshape(rows, self.kv_heads, hd)
            q = q * cos + _rotate_half(q) * sin
            # Query heads of one KV head side by side ([rows, kv_heads, groups, hd]): GQA without repeating K, V.
            # Written out rather than through scaled_dot_product_attention, whose CPU kernel costs more than the
            # arithmetic for a single query position; the softmax in fp32, as the models' eager attention.
            weights = torch.matmul(q.view(rows, self.kv_heads, groups, hd), keys[:, :, : t + 1].transpose(2, 3))
            weights = (weights * self.scaling + bias).softmax(-1, dtype=torch.float32).to(values.dtype)
            out = torch.matmul(weights, values[:, :, : t + 1])
            hidden = hidden + _linear(out.reshape(rows, self.heads * hd), attn.o_proj)
            b = layer.post_attention_layernorm.forward(hidden)
            hidden = hidden + _linear(mlp.act_fn(_linear(b, mlp.gate_proj)) * _linear(b, mlp.up_proj), mlp.down_proj)
        self.length = t + 1
        return _linear(base.norm.forward(hidden), self.lm.lm_head).contiguous()


def _linear(x: Tensor, linear: nn.Linear) -> Tensor:
    """``x Wᵀ + b`` for ``x [rows, in]`` computed as ``(W xᵀ)ᵀ``: the same product, but with a few rows against
    weights that are not in cache MKL streams the weights far better in this order (on 2 cores, 16 rows:
    0.95 against 2.1 ms for an 8k×256 LM head, 0.22 against 0.32 ms for a 768×256 projection). The result is a
    transposed view ``[rows, out]``."""
    y = torch.mm(linear.weight, x.t()).t()
    return y if linear.bias is None else y + linear.bias


def _rotate_half(x: Tensor) -> Tensor:
    """``[-x₂, x₁]`` for the two halves of the last dimension (RoPE's rotation, as the Llama family applies it)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _layer_cache(cache, index: int) -> tuple[Tensor, Tensor]:
    """Keys and values ``[rows, kv_heads, W, head_dim]`` of layer ``index`` of a ``DynamicCache``."""
    layer = cache.layers[index]
    return layer.keys, layer.values
