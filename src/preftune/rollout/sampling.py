"""Batched sampling from any causal LM policy: one :class:`SamplingParams`, one :func:`generate`.

Prompts are encoded as training encodes them (:mod:`preftune.rollout.encoding`: text with BOS, conversations
through the chat template with the generation prompt), **once per prompt**, and each prompt is *prefilled* once
for its group: the left-padded batch of unique prompts goes through the model once, and its KV cache (and
last-position logits) are repeated ``n`` times (``repeat_interleave``) before decoding, so sample ``j`` of prompt
``i`` is row ``i·n + j``. (Hugging Face's ``generate`` with ``num_return_sequences`` repeats the prompt ids
before the first forward instead, running the prefill on ``n`` copies: with a 128-token prompt, 64-token
completions and ``n = 8``, that prefill is 2× the FLOPs of the whole decode.)

Decoding is a plain loop over ``model(next_token, cache)`` (:func:`_decode`) that applies the same logits
processors as ``generate`` (temperature, top-k, top-p), feeds finished rows the pad id and ends when every row has
stopped, without ``generate``'s per-step bookkeeping. Each token is drawn by :func:`draw` (inverse-CDF sampling:
one uniform number per row, where ``torch.multinomial`` draws one exponential per vocabulary entry), so the
samples follow the same distribution as ``generate``'s but are not the same draws for a seed; greedy decoding
gives ``generate``'s tokens (tests/rollout/test_sampling.py checks both, and the draw's frequencies). For the
Llama family (Llama, Qwen2, Mistral) the decoding steps after the prefill run through
:class:`preftune.rollout.fast_decode.LlamaDecoder`: the same forward on the model's own weights with a
preallocated KV cache, without Hugging Face's per-step mask building, cache concatenation and module dispatch
(the same samples for a seed as the plain loop; tests/rollout/test_fast_decode.py). Models whose cache is not a
standard ``DynamicCache`` (and encoder–decoders) go through ``generate`` itself.

Generation stops at **every** end-of-sequence id: the tokenizer's EOS and each id of the model's
``generation_config.eos_token_id`` (an int or a list: Llama 3 ends turns with ``<|eot_id|>``, Qwen with
``<|im_end|>``). A completion is cut after the first of them and ``ended_with_eos`` records that it ended
with any; one that never did ran to ``max_new_tokens`` — or to the model's last position: a completion never
runs past ``max_position_embeddings`` (GPT-2's ``n_positions``), so its budget is ``min(max_new_tokens,
positions − prompt tokens)``, row by row (said once in the log), and a prompt that leaves no room is refused.

The sampled distribution is exactly the one named by the parameters: nothing a checkpoint's
``generation_config`` may switch on (repetition penalty, ``min_new_tokens``, ``top_k=50``, …) is applied, and
temperature, top-k and top-p are applied in that order (Hugging Face's warpers), followed by the record of the
per-token log-probs (see :class:`preftune.rollout.record.Rollout`).
With a seed the samples are reproducible for a given ``batch_size`` and the global torch RNG is untouched. With
``prompt_seeds`` each prompt draws from a generator of its own (:func:`_prompt_uniforms`), so its samples are the
same whether it is sampled alone, in a batch with any other prompts, or on any process of a distributed run (up to
float rounding of its logits in another batch, which moves a token only when a number falls on a boundary).
Left padding with an attention mask: position ids are derived from the mask (as ``generate`` derives them), so
padding does not shift positions.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from preftune.config import TrainConfig
from preftune.errors import ConfigError, DataError
from preftune.modeling.logprobs import max_positions, unwrap_causal_lm
from preftune.rollout import fast_decode
from preftune.rollout.encoding import Prompt, encode_prompts
from preftune.rollout.record import Rollout

log = logging.getLogger("preftune")

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
    * ``prompt_seeds`` — one int per prompt (or None): prompt ``i``'s ``n`` samples draw from a generator of their
      own, seeded with ``prompt_seeds[i]``, so they do not depend on which other prompts share the call, its
      batches or its process; ``seed`` is then not used.
    * ``batch_size`` — sequences per ``generate`` call: ``max(1, batch_size // n)`` prompts, ``n`` samples each.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = 0
    batch_size: int = 64
    prompt_seeds: tuple[int, ...] | None = None

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
        if self.prompt_seeds is not None:
            object.__setattr__(self, "prompt_seeds", tuple(self.prompt_seeds))  # hashable, like the rest
            bad = [s for s in self.prompt_seeds if not _is_int(s) or not 0 <= s < 2**63]
            if bad:
                raise ConfigError(f"sampling: prompt_seeds must be integers in [0, 2**63), got {bad[0]!r}")
        if self.temperature == 0 and self.n > 1:
            raise ConfigError(f"sampling: temperature=0 is greedy decoding, so the n={self.n} samples of a prompt "
                              "would all be the same; use temperature > 0 or n = 1")

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, n: int, seed: int | None = None,
                    prompt_seeds: Sequence[int] | None = None) -> SamplingParams:
        """How a run samples (online methods, rounds): the config's ``generation_budget`` (``max_completion_length``),
        ``temperature``, ``top_p`` and ``top_k``; ``n`` samples per prompt, ``seed`` or ``prompt_seeds`` as the caller
        draws them, and at least 64 sequences per call (a whole group per call when ``n`` is larger)."""
        return cls(max_new_tokens=cfg.generation_budget, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                   n=n, seed=seed, batch_size=max(64, n), prompt_seeds=prompt_seeds)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_precision(dtype: str | None, device: torch.device, run_precision=contextlib.nullcontext):
    """The precision a run samples in (``generation_dtype``): ``"bfloat16"`` autocast, ``"float32"`` (autocast off),
    or None: ``run_precision()``, the run's own context. Under bf16 autocast the policy's weights are cast once per
    call (autocast caches the casts of trainable leaf tensors for the whole block), not once per decoding step."""
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return run_precision()


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


def _warpers(params: SamplingParams) -> list[LogitsProcessor]:
    """Temperature, then top-k, then top-p (Hugging Face's order for its own warpers); none when greedy."""
    processors: list[LogitsProcessor] = []
    if not params.greedy:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=params.top_p))
    return processors


def _processors(params: SamplingParams, recorder: SampledLogProbs) -> LogitsProcessorList:
    """The warpers, then the recorder (for ``generate``)."""
    return LogitsProcessorList([*_warpers(params), recorder])


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNG for the block and restore the previous state after it; a no-op without a seed."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _prompt_uniforms(seeds: Sequence[int], n: int, steps: int, device: torch.device) -> Tensor:
    """The draw's numbers for prompts with seeds of their own: ``[steps, P·n]`` fp64 in [0, 1), column ``i·n + j``
    (sample ``j`` of prompt ``i``) from prompt ``i``'s generator. One call per prompt, not per step; a CPU generator,
    so the numbers are the same on every device, and a fixed shape (``max_new_tokens × n``), so they do not depend
    on the budgets of the prompts that share the batch."""
    columns = [torch.rand((steps, n), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
               for seed in seeds]
    return torch.cat(columns, dim=1).to(device)


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


@functools.cache
def _forward_keywords(cls: type) -> tuple[str, bool] | None:
    """How ``cls.forward`` takes a KV cache (``cache`` in transformers ≥ 5.x, ``past_key_values`` before) and
    whether it accepts ``logits_to_keep``; None when it takes neither cache keyword."""
    names = set(inspect.signature(cls.forward).parameters)
    cache = next((k for k in ("cache", "past_key_values") if k in names), None)
    return None if cache is None else (cache, "logits_to_keep" in names)


def _lean_decoding(lm: nn.Module) -> bool:
    """Whether :func:`_decode` can drive the model: a decoder-only LM with a standard ``DynamicCache``."""
    config = getattr(lm, "config", None)
    supports_dynamic = getattr(lm, "_supports_default_dynamic_cache", None)
    return (config is not None and not getattr(config, "is_encoder_decoder", False)
            and (supports_dynamic is None or supports_dynamic())
            and _forward_keywords(type(lm)) is not None)


def _decode(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams, stops: Tensor,
            pad_id: int, budgets: Tensor, uniforms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sample ``params.n`` continuations of each left-padded prompt row: prefill once per prompt, repeat the cache.

    ``input_ids``, ``attention_mask`` ``[P, W]``, ``budgets [P]`` (each prompt's most new tokens) →
    ``generated [P·n, T]`` (pad id after a row's stop token or budget) and the sampler's log-probs ``[P·n, T]``
    (fp32), ``T ≤ max(budgets)`` (the loop ends once every row has stopped).

    Per step: ``s = warpers(float(z_t))``; ``y_t ~ softmax(s)`` over all rows at once by :func:`draw` (greedy:
    ``argmax s``); a finished row gets the pad id; recorded ``log softmax(s)[y_t]``. ``uniforms [≥ T, P·n]``
    (fp64 in [0, 1)), when given, are the draw's numbers, step ``t`` using row ``t`` (see :func:`_prompt_uniforms`);
    else the draw takes them from torch's RNG.
    """
    cache_key, logits_to_keep = _forward_keywords(type(lm))
    n = params.n
    steps = int(budgets.max())
    warpers = _warpers(params)
    width = input_ids.shape[1]
    # Positions from the mask, as generate derives them (left padding does not shift a prompt's positions).
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    cache = DynamicCache(config=lm.config)
    extra = {"logits_to_keep": 1} if logits_to_keep else {}
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
             **{cache_key: cache}, **extra)
    logits = out.logits[:, -1].float()  # [P, V]
    del out
    if n > 1:  # the group's n rows share the prompt's prefill
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        positions = positions.repeat_interleave(n, dim=0)
        budgets = budgets.repeat_interleave(n, dim=0)
    rows = logits.shape[0]
    if fast_decode.supports(lm, width + steps):
        # The same forward on the model's own weights, without Hugging Face's per-step overhead (fast_decode).
        decoder = fast_decode.LlamaDecoder(lm, cache, attention_mask, steps)
        del cache
    else:
        decoder = None
        # The mask grows by one column per step: preallocated, each step passes a prefix of it.
        full_mask = attention_mask.new_ones((rows, width + steps))
        full_mask[:, :width] = attention_mask
    position = positions[:, -1:]
    # A row past its budget is fed pads at its last position, never past it, while the others go on.
    last_position = position + budgets[:, None]
    unfinished = torch.ones(rows, dtype=torch.bool, device=logits.device)
    pad = torch.tensor(pad_id, dtype=torch.long, device=logits.device)
    tokens: list[Tensor] = []
    logprobs: list[Tensor] = []
    for step in range(steps):
        scores = logits
        for warp in warpers:
            scores = warp(None, scores)
        token, logprob = draw(scores, params.greedy, None if uniforms is None else uniforms[step])
        logprobs.append(logprob)
        token = torch.where(unfinished, token, pad)
        tokens.append(token)
        unfinished &= ~torch.isin(token, stops) & (budgets > step + 1)
        if step + 1 == steps or not bool(unfinished.any()):
            break
        position = torch.minimum(position + 1, last_position)
        if decoder is not None:
            logits = decoder.step(token, position).float()
            continue
        out = lm(input_ids=token[:, None], attention_mask=full_mask[:, : width + step + 1], position_ids=position,
                 use_cache=True, **{cache_key: cache})
        logits = out.logits[:, -1].float()
        del out
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


DRAW_BLOCK = 256  # vocabulary entries per block of the two-level draw


def draw(scores: Tensor, greedy: bool = False, uniform: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token per row from ``softmax(scores)`` and its log-prob: ``scores [rows, V]`` fp32 (``-inf`` where a
    warper filtered a token) → ``token [rows]`` (long), ``log p(token) [rows]`` (fp32). ``uniform [rows]`` (fp64 in
    [0, 1)) are the rows' random numbers when the caller draws them (one generator per prompt); else
    ``torch.rand``.

    Inverse-CDF sampling, one uniform number per row (``torch.multinomial`` draws one exponential per vocabulary
    entry: on a CPU that alone cost as much as a small model's decoding step, 4 ms for 16 rows of an 8k
    vocabulary), in two levels so that nothing of size ``[rows, V]`` is accumulated or held in fp64. With
    ``w = exp(s − max s)`` cut into blocks of :data:`DRAW_BLOCK` entries (the last one padded with zero weights),
    block sums ``S_b`` and their fp64 running sums ``C_b``: draw ``u ~ U(0, 1]``, take the first block ``b`` with
    ``C_b ≥ u·C_last``, then in it the first entry ``i`` with ``c_i ≥ f·c_last``, where ``c`` is the block's own
    fp64 running sum and ``f = (u·C_last − C_{b−1}) / S_b ∈ (0, 1]`` is where ``u`` falls inside the block. So
    entry ``i`` of block ``b`` is drawn with probability ``(S_b / C_last)·(w_i / c_last) = w_i / Σ w`` (up to the
    fp32 rounding of ``S_b``, 1e-7 relative), and a filtered entry (``w_i = 0``, an empty interval) never.
    Greedy is ``argmax s``. ``log p(i) = s_i − max s − log Σ w``, the ``log_softmax`` of the scores sampled from.
    """
    rows, vocab = scores.shape
    blocks = -(-vocab // DRAW_BLOCK)
    top = scores.amax(-1, keepdim=True)
    weights = scores.new_zeros(rows, blocks * DRAW_BLOCK)
    torch.sub(scores, top, out=weights[:, :vocab]).exp_()
    weights = weights.view(rows, blocks, DRAW_BLOCK)
    block_sums = weights.sum(-1)  # [rows, blocks]
    if not bool(torch.isfinite(block_sums).all()):
        raise ValueError("the model's next-token scores hold NaN or inf, so no token can be sampled (a diverged or "
                         "broken model: check its weights and the run's loss)")
    if greedy:
        token = scores.argmax(-1)
    else:
        cumulative = block_sums.double().cumsum(-1)
        if uniform is None:
            uniform = torch.rand(rows, dtype=torch.float64, device=scores.device)
        u = (1 - uniform[:, None]) * cumulative[:, -1:]
        block = torch.searchsorted(cumulative, u)  # [rows, 1]
        before = torch.where(block > 0, cumulative.gather(1, (block - 1).clamp_min(0)), 0.0)
        within = ((u - before) / block_sums.gather(1, block).double()).clamp_max(1.0)
        inner = weights.gather(1, block[:, :, None].expand(-1, -1, DRAW_BLOCK)).squeeze(1).double().cumsum(-1)
        token = (block * DRAW_BLOCK + torch.searchsorted(inner, within * inner[:, -1:])).squeeze(1)
    logprob = scores.gather(1, token[:, None]).squeeze(1) - top.squeeze(1) - block_sums.sum(-1).log()
    return token, logprob


def _hf_decode(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams,
               stops: list[int], pad_id: int, budgets: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_decode`'s contract through Hugging Face's ``generate`` (models :func:`_lean_decoding` refuses); one
    budget for the batch, its smallest."""
    recorder = SampledLogProbs()
    sequences = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=int(budgets.min()),
        num_return_sequences=params.n, eos_token_id=stops, pad_token_id=pad_id, use_cache=True,
        logits_processor=_processors(params, recorder), **NEUTRAL_PROCESSORS, do_sample=not params.greedy,
    )
    generated = sequences[:, input_ids.shape[1] :]
    return generated, recorder.token_logprobs(generated)


def _budgets(model: nn.Module, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, source: str) -> list[int]:
    """Each prompt's most new tokens: ``min(max_new_tokens, positions − len(prompt))``, so that no sample reads past
    the model's last position; a prompt that leaves no room is refused by row."""
    positions = max_positions(model)
    if positions is None:
        return [max_new_tokens] * len(prompt_ids)
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= positions:
            raise DataError(source, i, "prompt", f"has {len(ids)} tokens but the model reads at most {positions} "
                            "positions, which leaves no room for a completion; shorten the prompt or use a model "
                            "with more positions")
    budgets = [min(max_new_tokens, positions - len(ids)) for ids in prompt_ids]
    if min(budgets) < max_new_tokens:
        _log_capped_budget(positions, max_new_tokens)
    return budgets


@functools.cache
def _log_capped_budget(positions: int, max_new_tokens: int) -> None:
    # Once per process and setting: online runs sample at every step.
    log.info("sampling: the model reads at most %d positions, so a completion stops at %d minus its prompt's tokens "
             "where that comes before max_new_tokens=%d", positions, positions, max_new_tokens)


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
    budgets = _budgets(model, prompt_ids, params.max_new_tokens, source)
    stops = stop_token_ids(model, tokenizer)
    stop_set = set(stops)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    lm = unwrap_causal_lm(model)
    device = next(lm.parameters()).device
    lean = _lean_decoding(lm)
    seeds = params.prompt_seeds
    if seeds is not None and len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} prompt_seeds")
    # generate draws from torch's RNG: there a prompt with a seed of its own is sampled alone, under it.
    per_call = 1 if seeds is not None and not lean else max(1, params.batch_size // params.n)
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    out = Rollout(prompts=list(prompts), prompt_ids=prompt_ids, group_size=params.n)

    was_training = model.training
    model.eval()
    try:
        with _seeded(params.seed if seeds is None else None, device):
            for start in range(0, len(prompt_ids), per_call):
                end = start + per_call
                input_ids, attention_mask = _left_padded(prompt_ids[start:end], pad_id, device)
                room = torch.tensor(budgets[start:end], dtype=torch.long, device=device)
                if lean:
                    uniforms = (None if seeds is None or params.greedy
                                else _prompt_uniforms(seeds[start:end], params.n, params.max_new_tokens, device))
                    generated, logprobs = _decode(lm, input_ids, attention_mask, params, stop_tensor, pad_id, room,
                                                  uniforms)
                else:
                    with _seeded(None if seeds is None else seeds[start], device):
                        generated, logprobs = _hf_decode(model, input_ids, attention_mask, params, stops, pad_id,
                                                         room)
                logprobs = logprobs.cpu().tolist()
                for row, ids in enumerate(generated.cpu().tolist()):
                    # A row cut at its budget is followed by pads: they are no part of it.
                    length = min(_cut_at_stop(ids, stop_set), budgets[start + row // params.n])
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
