"""The rollout record: what sampling produced, laid out once, read by judges, pair building, metrics and
online training alike.

``P`` prompts, ``n`` samples each (a *group*), ``N = P·n`` samples; sample ``j`` of prompt ``i`` is at flat
index ``k = i·n + j`` (so prompt ``k // n``). Per prompt (length ``P``):

* ``prompts`` — as given: strings or conversations (lists of ``{role, content}`` messages);
* ``prompt_ids`` — the prompt's token ids as training encodes it (BOS / chat template), encoded once per group.

Per sample (length ``N``, ragged lists):

* ``completion_ids[k]`` — generated ids, no padding, ending with a stop id iff ``ended_with_eos[k]``;
* ``logprobs[k]`` — one float per completion id: the sampler's log-probability of that token,
  ``log softmax(z̃_t)[y_t]`` where ``z̃_t`` are the logits after temperature, top-k and top-p (in that order),
  i.e. the distribution the token was actually drawn from. At temperature 1 without filters this is
  ``log π(y_t | x, y_<t)``; at temperature T without filters ``log softmax(z_t / T)[y_t]``; with top-k/top-p
  it is the renormalised filtered distribution; greedy decoding (temperature 0) records ``log π`` of the
  argmax. (These are the generation-time numbers; a training forward recomputes log π in its own precision.)
* ``ended_with_eos[k]`` — the completion ended with any of the stop ids (tokenizer EOS or generation config);
* ``completions[k]`` — the decoded text before the stop token, special tokens skipped;
* ``scores[k]`` — the judge's score, filled by :func:`preftune.rollout.judges.score_rollout` (``judge`` names it).

:meth:`Rollout.padded` turns the ragged per-sample lists into right-padded tensors with a mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """``group_size`` samples of each of ``len(prompts)`` prompts; see the module docstring for the fields."""

    prompts: list[Any]
    prompt_ids: list[list[int]]
    group_size: int = 1
    completion_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    ended_with_eos: list[bool] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    judge: str | None = None

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if len(self.prompt_ids) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.prompt_ids)} prompt_ids")

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def check(self) -> None:
        """Every per-sample list has ``N = P·n`` entries and log-probs align with completion ids."""
        n = self.num_prompts * self.group_size
        lists = {"completion_ids": self.completion_ids, "logprobs": self.logprobs,
                 "ended_with_eos": self.ended_with_eos, "completions": self.completions}
        if self.scores is not None:
            lists["scores"] = self.scores
        wrong = {name: len(v) for name, v in lists.items() if len(v) != n}
        if wrong:
            raise ValueError(f"a rollout of {self.num_prompts} prompts × {self.group_size} needs {n} entries per "
                             f"sample list, got {wrong}")
        if any(len(c) != len(lp) for c, lp in zip(self.completion_ids, self.logprobs)):
            raise ValueError("logprobs[k] must hold one value per token of completion_ids[k]")

    def prompt_index(self, k: int) -> int:
        """The prompt of sample ``k``."""
        return k // self.group_size

    def select(self, prompts: Sequence[int]) -> Rollout:
        """The rollout of prompts ``prompts`` (indices, in that order) with their samples (sample k of prompt i sits
        at i·n + k)."""
        n = self.group_size
        samples = [i * n + k for i in prompts for k in range(n)]
        pick = lambda values: [values[j] for j in samples]  # noqa: E731
        return Rollout([self.prompts[i] for i in prompts], [self.prompt_ids[i] for i in prompts], n,
                       pick(self.completion_ids), pick(self.logprobs), pick(self.ended_with_eos),
                       pick(self.completions), None if self.scores is None else pick(self.scores), self.judge)

    @classmethod
    def concat(cls, parts: Sequence[Rollout]) -> Rollout:
        """One rollout of several with the same group size, prompts in order."""
        first = parts[0]
        joined = lambda name: [v for part in parts for v in getattr(part, name)]  # noqa: E731
        scores = None if any(part.scores is None for part in parts) else joined("scores")
        return cls(joined("prompts"), joined("prompt_ids"), first.group_size, joined("completion_ids"),
                   joined("logprobs"), joined("ended_with_eos"), joined("completions"), scores, first.judge)

    @property
    def sample_prompts(self) -> list[Any]:
        """``prompts`` repeated per sample (length N), aligned with ``completions``."""
        return [p for p in self.prompts for _ in range(self.group_size)]

    @property
    def sample_prompt_ids(self) -> list[list[int]]:
        """``prompt_ids`` repeated per sample (length N; the lists are shared, not copied)."""
        return [p for p in self.prompt_ids for _ in range(self.group_size)]

    @property
    def lengths(self) -> list[int]:
        """Completion lengths in tokens, the stop token included when produced."""
        return [len(ids) for ids in self.completion_ids]

    def groups(self) -> Iterator[range]:
        """Flat index ranges of each prompt's samples, in prompt order."""
        for start in range(0, len(self), self.group_size):
            yield range(start, start + self.group_size)

    def grouped(self, values: Sequence[float]) -> Tensor:
        """A per-sample vector (length N) as ``[P, n]`` (row i = prompt i's group)."""
        return torch.as_tensor(list(values), dtype=torch.float32).view(self.num_prompts, self.group_size)

    def padded(self, pad_id: int = 0) -> dict[str, Tensor]:
        """Right-padded per-sample tensors ``[N, T]`` (T = the longest completion): ``completion_ids`` (long,
        ``pad_id`` after the end), ``completion_mask`` (bool), ``logprobs`` (fp32, 0 after the end), and
        ``ended_with_eos [N]`` (bool)."""
        width = max(self.lengths, default=0)
        ids = torch.full((len(self), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(self), width), dtype=torch.bool)
        logprobs = torch.zeros((len(self), width), dtype=torch.float32)
        for k, (c, lp) in enumerate(zip(self.completion_ids, self.logprobs)):
            ids[k, : len(c)] = torch.as_tensor(c, dtype=torch.long)
            mask[k, : len(c)] = True
            logprobs[k, : len(lp)] = torch.as_tensor(lp, dtype=torch.float32)
        return {"completion_ids": ids, "completion_mask": mask, "logprobs": logprobs,
                "ended_with_eos": torch.as_tensor(self.ended_with_eos, dtype=torch.bool)}

    def to_rows(self) -> list[dict]:
        """One JSON-ready dict per sample: ``prompt``, ``completion``, ``tokens``, ``ended_with_eos`` (and
        ``score`` once judged)."""
        rows = [{"prompt": p, "completion": c, "tokens": n, "ended_with_eos": e}
                for p, c, n, e in zip(self.sample_prompts, self.completions, self.lengths, self.ended_with_eos)]
        if self.scores is not None:
            for row, score in zip(rows, self.scores):
                row["score"] = score
        return rows
