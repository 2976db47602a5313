"""Batched sampling from any causal LM policy, with the KV cache, left padding and a seed.

Sample ``j`` of prompt ``i`` sits at flat index ``i * num_samples + j`` of :class:`Samples`. Prompts are
encoded the way training encodes text prompts (with the tokenizer's default special tokens, so they start
with BOS), and completions are the generated tokens up to and including the first EOS; a completion that
never produced EOS ran to ``max_new_tokens``. Those ids are exactly what the sampled distribution was
conditioned on, so log-probs and KLs computed on them (right-padded, see
:func:`preftune.data.batching.pad_sequences`) describe the same sequences the sampler drew: generation
derives position ids from the attention mask, so left padding does not shift positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from preftune.modeling.logprobs import unwrap_causal_lm

# Logits processors a checkpoint's generation_config may switch on; evaluation samples from π itself.
NEUTRAL_PROCESSORS = dict(num_beams=1, repetition_penalty=None, no_repeat_ngram_size=None, min_new_tokens=None,
                          min_length=None, min_p=None, typical_p=None, epsilon_cutoff=None, eta_cutoff=None,
                          suppress_tokens=None, begin_suppress_tokens=None, bad_words_ids=None)


@dataclass
class Samples:
    """Completions of ``len(prompts) // num_samples`` distinct prompts, ``num_samples`` each, flattened.

    Per sample: ``prompts[n]`` (text), ``prompt_ids[n]`` (with BOS), ``completion_ids[n]`` (no padding,
    ending with EOS iff ``ended_with_eos[n]``), ``completions[n]`` (decoded without special tokens).
    """

    prompts: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    ended_with_eos: list[bool]
    num_samples: int = 1

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def lengths(self) -> list[int]:
        """Completion lengths in tokens, EOS included when produced."""
        return [len(ids) for ids in self.completion_ids]

    def to_rows(self) -> list[dict]:
        """One JSON-ready dict per sample: ``prompt``, ``completion``, ``tokens``, ``ended_with_eos``."""
        return [{"prompt": p, "completion": c, "tokens": n, "ended_with_eos": e}
                for p, c, n, e in zip(self.prompts, self.completions, self.lengths, self.ended_with_eos)]

    def groups(self) -> Iterator[range]:
        """Flat index ranges of each prompt's ``num_samples`` samples, in prompt order."""
        for start in range(0, len(self), self.num_samples):
            yield range(start, start + self.num_samples)


@contextlib.contextmanager
def _left_padding(tokenizer):
    """Left padding (generation appends on the right), with EOS as the pad token if there is none; restored after."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:  # masked positions never influence the result, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNG for the block and restore the previous state after it; a no-op without a seed."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _sampling_kwargs(temperature: float, top_p: float, top_k: int) -> dict:
    """``model.generate`` kwargs: greedy at temperature 0, else pure sampling with the given filters.

    Every knob is passed explicitly, so a model's own ``generation_config`` (often ``top_k=50``) cannot
    silently change the distribution being evaluated.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if temperature == 0:
        return dict(NEUTRAL_PROCESSORS, do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(NEUTRAL_PROCESSORS, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)


def _cut_at_eos(generated: list[int], eos_id: int) -> tuple[list[int], bool]:
    """Tokens up to and including the first EOS. Rows without EOS ran the full length, so nothing after
    them is padding (and a pad id the model itself sampled is kept as the token it is)."""
    if eos_id in generated:
        return generated[: generated.index(eos_id) + 1], True
    return generated, False


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_samples: int = 1,
    batch_size: int = 64,
    seed: int | None = None,
) -> Samples:
    """Sample ``num_samples`` completions of each prompt; see the module docstring for the layout.

    ``temperature == 0`` is greedy decoding. With ``seed`` set the result is deterministic (for a given
    ``batch_size``) and the global torch RNG is left untouched; without it the global RNG is used.
    """
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("num_samples, batch_size and max_new_tokens must be >= 1")
    sampling = _sampling_kwargs(temperature, top_p, top_k)
    eos_id = tokenizer.eos_token_id
    device = next(unwrap_causal_lm(model).parameters()).device
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    out = Samples([], [], [], [], [], num_samples=num_samples)

    was_training = model.training
    model.eval()
    try:
        with _seeded(seed, device), _left_padding(tokenizer):
            for start in range(0, len(flat_prompts), batch_size):
                batch = flat_prompts[start : start + batch_size]
                enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
                width = enc["input_ids"].shape[1]
                generated = model.generate(
                    **enc, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
                    use_cache=True, **sampling,
                )[:, width:].tolist()
                for row, text in enumerate(batch):
                    completion, ended = _cut_at_eos(generated[row], eos_id)
                    prompt_len = int(enc["attention_mask"][row].sum())
                    out.prompts.append(text)
                    out.prompt_ids.append(enc["input_ids"][row, width - prompt_len :].tolist())
                    out.completion_ids.append(completion)
                    out.ended_with_eos.append(ended)
    finally:
        model.train(was_training)
    out.completions = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)
    return out
