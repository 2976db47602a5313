"""Batched sampling from any causal LM policy: one :class:`SamplingParams`, one :func:`generate`.

Prompts are encoded as training encodes them (:mod:`preftune.rollout.encoding`: text with BOS, conversations
through the chat template with the generation prompt), **once per prompt**: each prompt's ids are left-padded
into a batch and Hugging Face's ``generate`` expands them to the ``n`` samples of the group
(``num_return_sequences``), so sample ``j`` of prompt ``i`` is row ``i·n + j``. (The prefill forward still runs
on the ``n`` copies: ``generate`` repeats the ids before the first forward; the tokenization and the padded
prompt batch are made once.)

Generation stops at **every** end-of-sequence id: the tokenizer's EOS and each id of the model's
``generation_config.eos_token_id`` (an int or a list: Llama 3 ends turns with ``<|eot_id|>``, Qwen with
``<|im_end|>``). A completion is cut after the first of them and ``ended_with_eos`` records that it ended
with any; one that never did ran to ``max_new_tokens``.

The sampled distribution is exactly the one named by the parameters: every other logits processor a
checkpoint's ``generation_config`` may switch on (repetition penalty, ``min_new_tokens``, ``top_k=50``, …)
is turned off, and temperature, top-k and top-p are applied by processors this module installs, in that
order, followed by a recorder of the per-token log-probs (see :class:`preftune.rollout.record.Rollout`).
With a seed the samples are reproducible for a given ``batch_size`` and the global torch RNG is untouched.
Left padding with an attention mask: ``generate`` derives position ids from the mask, so padding does not
shift positions, and the KV cache is used.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from preftune.errors import ConfigError
from preftune.modeling.logprobs import unwrap_causal_lm
from preftune.rollout.encoding import Prompt, encode_prompts
from preftune.rollout.record import Rollout

# Logits processors a checkpoint's generation_config may switch on; the rollout samples from the distribution
# its SamplingParams name, nothing else.
NEUTRAL_PROCESSORS = dict(
    num_beams=1, repetition_penalty=None, encoder_repetition_penalty=None, no_repeat_ngram_size=None,
    encoder_no_repeat_ngram_size=None, min_new_tokens=None, min_length=None, min_p=None, typical_p=None,
    top_h=None, epsilon_cutoff=None, eta_cutoff=None, suppress_tokens=None, begin_suppress_tokens=None,
    bad_words_ids=None, sequence_bias=None, forced_bos_token_id=None, forced_eos_token_id=None,
    exponential_decay_length_penalty=None, guidance_scale=None, renormalize_logits=False,
    remove_invalid_values=False, watermarking_config=None, stop_strings=None,
    # Temperature, top-k and top-p are installed explicitly (see _processors), so generate adds none itself.
    temperature=None, top_k=None, top_p=None,
)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: validated once, at construction, with :class:`ConfigError` naming the field.

    * ``max_new_tokens`` — completion budget in tokens (EOS included when produced).
    * ``temperature`` — ``0`` is greedy decoding (argmax; then ``n`` must be 1, the samples would be equal).
    * ``top_p`` ∈ (0, 1] and ``top_k`` ≥ 0 (0 = off) — nucleus and top-k filters, after the temperature.
    * ``n`` — samples per prompt (a group).
    * ``seed`` — an int for reproducible samples (the global RNG is left alone), None to draw from the
      global torch RNG.
    * ``batch_size`` — sequences per ``generate`` call: ``max(1, batch_size // n)`` prompts, ``n`` samples each.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = 0
    batch_size: int = 64

    def __post_init__(self):
        for name in ("max_new_tokens", "n", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"sampling: {name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"sampling: top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"sampling: temperature must be a finite number >= 0 (0 = greedy), "
                              f"got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling: top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ConfigError(f"sampling: seed must be an integer or None, got {self.seed!r}")
        if self.temperature == 0 and self.n > 1:
            raise ConfigError(f"sampling: temperature=0 is greedy decoding, so the n={self.n} samples of a prompt "
                              "would all be the same; use temperature > 0 or n = 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, then each of the model's
    ``generation_config.eos_token_id`` (an int or a list), without repeats."""
    ids: list[int] = []
    config = getattr(unwrap_causal_lm(model), "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    for i in [tokenizer.eos_token_id, *configured]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ConfigError("neither the tokenizer nor the model's generation_config names an EOS token, so "
                          "generation could never end a completion; set tokenizer.eos_token")
    return ids


class SampledLogProbs(LogitsProcessor):
    """The last logits processor: records ``log softmax(z̃_t)[y_t]`` for the token ``y_t`` drawn at each step,
    where ``z̃_t`` are the logits after every processor before it (the distribution actually sampled from).

    At step t it keeps ``log softmax(z̃_t)`` ``[B, V]`` and, at step t+1, reads the token just appended from
    ``input_ids``; only one ``[B, V]`` tensor is alive, never ``[steps, B, V]``.
    """

    def __init__(self):
        self._previous: Tensor | None = None
        self._steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._previous is not None:
            self._steps.append(self._previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self._previous = scores.float().log_softmax(-1)
        return scores

    def token_logprobs(self, generated: Tensor) -> Tensor:
        """fp32 ``[B, G]`` log-probs of the ``G`` generated tokens ``generated [B, G]``."""
        steps = self._steps[: generated.shape[1]]
        if len(steps) < generated.shape[1]:  # the final step: its token is the last one generated
            steps.append(self._previous.gather(1, generated[:, -1:]).squeeze(1))
        return torch.stack(steps, dim=1) if steps else generated.new_zeros(generated.shape, dtype=torch.float32)


def _processors(params: SamplingParams, recorder: SampledLogProbs) -> LogitsProcessorList:
    """Temperature, then top-k, then top-p (Hugging Face's order for its own warpers), then the recorder."""
    processors: list[LogitsProcessor] = []
    if not params.greedy:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=params.top_p))
    return LogitsProcessorList([*processors, recorder])


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNG for the block and restore the previous state after it; a no-op without a seed."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _left_padded(prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, W]``, each prompt right-aligned (generation appends on the right)."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        if ids:
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def _cut_at_stop(generated: list[int], stop_ids: set[int]) -> int:
    """Length of the completion: up to and including the first stop id, else everything (a row that never
    stopped ran the full length, so nothing after it is padding — a pad id it sampled is kept)."""
    for position, token in enumerate(generated):
        if token in stop_ids:
            return position + 1
    return len(generated)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | None = None,
             *, source: str = "prompts", prompt_ids: Sequence[Sequence[int]] | None = None) -> Rollout:
    """Sample ``params.n`` completions of each prompt; see the module docstring and :class:`Rollout`.

    ``prompts`` are strings or conversations (all of one kind; ``source`` names them in errors). ``prompt_ids``,
    when given, are their token ids already encoded as training encodes them (and truncated as the run's data
    was): they are used as they are. The model is put in eval mode for sampling and restored after.
    """
    params = params or SamplingParams()
    if prompt_ids is None:
        prompt_ids = encode_prompts(tokenizer, prompts, source)  # validates them too
    else:
        if len(prompt_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt_ids")
        prompt_ids = [list(ids) for ids in prompt_ids]
    stops = stop_token_ids(model, tokenizer)
    stop_set = set(stops)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(unwrap_causal_lm(model).parameters()).device
    per_call = max(1, params.batch_size // params.n)
    sampling = dict(NEUTRAL_PROCESSORS, do_sample=not params.greedy)
    out = Rollout(prompts=list(prompts), prompt_ids=prompt_ids, group_size=params.n)

    was_training = model.training
    model.eval()
    try:
        with _seeded(params.seed, device):
            for start in range(0, len(prompt_ids), per_call):
                input_ids, attention_mask = _left_padded(prompt_ids[start : start + per_call], pad_id, device)
                recorder = SampledLogProbs()
                sequences = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=params.max_new_tokens,
                    num_return_sequences=params.n, eos_token_id=stops, pad_token_id=pad_id, use_cache=True,
                    logits_processor=_processors(params, recorder), **sampling,
                )
                generated = sequences[:, input_ids.shape[1] :]
                logprobs = recorder.token_logprobs(generated).cpu().tolist()
                for row, ids in enumerate(generated.cpu().tolist()):
                    length = _cut_at_stop(ids, stop_set)
                    out.completion_ids.append(ids[:length])
                    out.logprobs.append(logprobs[row][:length])
                    out.ended_with_eos.append(length > 0 and ids[length - 1] in stop_set)
    finally:
        model.train(was_training)
    # The text is what precedes the stop token (an EOS id of the generation config need not be a special
    # token the tokenizer would skip).
    content = [ids[:-1] if ended else ids for ids, ended in zip(out.completion_ids, out.ended_with_eos)]
    out.completions = tokenizer.batch_decode(content, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return out
