"""Collators: tokenized rows → padded tensors for one forward of the policy.

Paired rows become ``2B`` sequences in one batch — rows ``0..B-1`` are ``prompt+chosen``, rows
``B..2B-1`` are ``prompt+rejected`` — so chosen and rejected go through the model in one forward.
Unpaired rows (KTO) become ``B`` sequences plus ``B`` *mismatched* ones (prompt i with completion
i+1 mod B) used for KTO's KL estimate.

Every collator returns ``input_ids``, ``attention_mask`` and ``completion_mask`` of shape ``[N, L]``;
``completion_mask`` is 1 on the positions of completion tokens (the tokens whose log-prob is scored).
Precomputed reference log-probs, when the rows carry them, pass through as ``[B]`` fp32 tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps")


def pad_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> dict[str, Tensor]:
    """Right-pad ``prompt + completion`` rows; returns ``input_ids``, ``attention_mask``, ``completion_mask``."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    n, width = len(lengths), max(lengths)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _reference_columns(rows: Sequence[dict]) -> dict[str, Tensor]:
    return {
        name: torch.tensor([row[name] for row in rows], dtype=torch.float32)
        for name in REF_COLUMNS
        if name in rows[0]
    }


@dataclass
class PairedCollator:
    pad_token_id: int

    def __call__(self, rows: Sequence[dict]) -> dict[str, Tensor]:
        prompts = [row["prompt_ids"] for row in rows]
        batch = pad_sequences(
            prompts + prompts,
            [row["chosen_ids"] for row in rows] + [row["rejected_ids"] for row in rows],
            self.pad_token_id,
        )
        return batch | _reference_columns(rows)


@dataclass
class UnpairedCollator:
    pad_token_id: int

    def __call__(self, rows: Sequence[dict]) -> dict[str, Tensor]:
        prompts = [row["prompt_ids"] for row in rows]
        completions = [row["completion_ids"] for row in rows]
        # KTO's reference point: prompt i with the completion of row i+1 (the label does not matter).
        mismatched = completions[1:] + completions[:1]
        batch = pad_sequences(prompts + prompts, completions + mismatched, self.pad_token_id)
        batch["desirable"] = torch.tensor([bool(row["label"]) for row in rows])
        return batch | _reference_columns(rows)
