"""Model FLOPs of one DPO training step (the *useful* work, the same count for every tool) and the machine's
measured matmul peak, for model-FLOPs utilisation (MFU).

FLOP convention (one multiply-add = 2 FLOPs), per preference pair with P prompt tokens (BOS included) and C, R
chosen / rejected tokens (EOS included):

* body: ``6 · N_body · (P + C + R)`` — forward (2) + backward (4) of every matmul weight in the decoder layers
  (q, k, v, o, gate, up, down; norms and the embedding lookup are not matmuls), over the *unique* tokens:
  the prompt is counted once, as a prefix-sharing implementation processes it;
* LM head: ``6 · H · V · (C + R)`` — only positions whose next token is a completion token need logits;
* attention scores (QKᵀ and A·V): ``12 · n_layers · d_attn · A`` with ``d_attn = n_heads · head_dim`` and
  ``A`` the attended (query, key) pairs of the causal, prefix-shared pair
  ``A = P(P+1)/2 + P·C + C(C+1)/2 + P·R + R(R+1)/2`` (forward ``4·d_attn`` per pair, ×3 for training);
* excluded: the reference forward (a fixed reference can be precomputed once), gradient-checkpointing
  recomputation, padding, the duplicated prompt, softmax/norm/elementwise work and the optimizer step.

So a tool that recomputes (checkpointing), duplicates the prompt, pads, or runs the reference every step does
more hardware work than this count; MFU measures useful work per second against the machine peak.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CONVENTION = (
    "useful training FLOPs per pair = 6·N_body·(P+C+R) + 6·H·V·(C+R) + 12·n_layers·d_attn·A, "
    "A = P(P+1)/2 + P·C + C(C+1)/2 + P·R + R(R+1)/2 (causal, prompt counted once); "
    "N_body = decoder-layer matmul weights; reference forward, checkpoint recompute, padding and the "
    "duplicated prompt excluded; 1 multiply-add = 2 FLOPs"
)


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config_file(cls, path: Path) -> ModelDims:
        """Read a Llama-style ``config.json``."""
        c = json.loads(Path(path).read_text())
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return cls(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                   kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], head_dim=head_dim,
                   intermediate=c["intermediate_size"], vocab=c["vocab_size"])

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def body_params(self) -> int:
        """Matmul weights of the decoder layers (q, k, v, o projections and the gated MLP)."""
        q_o = 2 * self.hidden * self.attn_width
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (q_o + k_v + mlp)

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab


def attended_pairs(p: int, c: int, r: int) -> int:
    """Causal (query, key) pairs of a prompt shared by its two responses."""
    return p * (p + 1) // 2 + p * c + c * (c + 1) // 2 + p * r + r * (r + 1) // 2


def pair_flops(dims: ModelDims, p: int, c: int, r: int) -> dict[str, float]:
    """Useful training FLOPs of one pair, by part (see the module docstring)."""
    body = 6 * dims.body_params * (p + c + r)
    head = 6 * dims.head_params * (c + r)
    attention = 12 * dims.layers * dims.attn_width * attended_pairs(p, c, r)
    return {"body": body, "head": head, "attention": attention, "total": body + head + attention}


def mean_pair_flops(dims: ModelDims, lengths: list[tuple[int, int, int]]) -> dict[str, float]:
    """:func:`pair_flops` averaged over the pairs of a dataset."""
    parts = [pair_flops(dims, *x) for x in lengths]
    return {k: sum(f[k] for f in parts) / len(parts) for k in parts[0]}


# --------------------------------------------------------------------------------------------- peak


@dataclass
class MatmulPeak:
    """Best measured GEMM throughput (FLOP/s) per dtype, and the sizes tried."""

    threads: int
    by_dtype: dict[str, float]
    samples: list[dict[str, float | int | str]]

    @property
    def peak(self) -> float:
        return max(self.by_dtype.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "peak": self.peak}


def measure_matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 5) -> MatmulPeak:
    """Time square fp32 and bf16 GEMMs with the default torch thread count; the best of ``repeats`` per size."""
    import torch

    samples: list[dict[str, float | int | str]] = []
    by_dtype: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for n in sizes:
            a = torch.randn(n, n, dtype=dtype)
            b = torch.randn(n, n, dtype=dtype)
            a @ b  # warm-up: allocation, kernel selection
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
            flops = 2 * n**3 / min(times)
            samples.append({"dtype": name, "n": n, "flop_per_s": flops})
            by_dtype[name] = max(by_dtype.get(name, 0.0), flops)
    return MatmulPeak(threads=torch.get_num_threads(), by_dtype=by_dtype, samples=samples)
