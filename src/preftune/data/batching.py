"""Collators: tokenized rows → the tensors of one forward of the policy.

A *unit* is one prompt followed by one or more *branches* (completions). Paired rows give a unit with
two branches, chosen and rejected; unpaired rows (KTO) give the completion and the row's mismatched
completion ``kl_completion_ids`` (prompt i with the completion of another row, for KTO's KL estimate),
fixed once when the data was tokenized (:func:`preftune.data.tokenize.mismatched_partners`) so that every
batch order, and the precomputed reference, pairs the same (x_i, y_j). Two switches shape the batch:

* ``prefix_sharing`` — the prompt is encoded once and every branch follows it in the same row; a branch
  attends to the prompt and to itself only, and its positions restart where the prompt ends (so RoPE
  and learned positions see exactly what two separate sequences would). Off: one row per branch,
  ``prompt + completion``, the prompt repeated.
* ``padding_free`` — units are packed into rows (first-fit decreasing, never longer than the longest
  unit), each attending only within itself. Off: one unit per row, right-padded.

Scoring is explicit, so every layout is read the same way: ``score_index [M]`` points into the flattened
``[R·L]`` positions whose hidden state predicts ``score_target [M]``, a token of sequence
``score_seq [M]``; sequences are numbered ``0..S-1`` with the first branch of unit i at i and the second
at B + i (chosen / rejected, or completion / mismatched). A branch with a mask (``chosen_mask``,
``completion_mask``, … : one bool per completion token, from conversations) is scored only where the mask
is True — its assistant turns; the other tokens are in the sequence, read as context. ``seq_tokens [S]``
counts each sequence's scored tokens and ``seq_last_index [S]`` is the flat position of its last token
(where a reward model reads its score). Scores are grouped by sequence, in token order.

Per-example quantities a loss reads besides log-probs (``extras``, e.g. SPPO's ``chosen_win_prob``) are
float columns of the rows, batched as ``[B]`` tensors under their own names, in row order.

The attention mask is ``[R, L]`` (plain right padding) or a boolean ``[R, 1, L, L]`` (True = may attend)
for shared or packed layouts, with ``position_ids [R, L]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps")
SOURCE_ROW = "source_row"  # as preftune.data.formats names it


@dataclass
class Branch:
    completion: Sequence[int]
    seq: int  # the sequence id it is scored as
    mask: Sequence[bool] | None = None  # score only where True (assistant turns); None: every token


@dataclass
class Unit:
    prompt: Sequence[int]
    branches: list[Branch]

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(b.completion) for b in self.branches)


def _branch(row: dict, name: str, seq: int) -> Branch:
    return Branch(row[f"{name}_ids"], seq, row.get(f"{name}_mask"))


def units_from_rows(rows: Sequence[dict], prefix_sharing: bool, sft: bool = False) -> tuple[list[Unit], int]:
    """Units for paired (``chosen_ids``/``rejected_ids``), unpaired (``completion_ids``, with KTO's mismatched
    branch ``kl_completion_ids``) or SFT rows (``completion_ids``, one branch); also S, the number of scored
    sequences."""
    b = len(rows)
    if sft:
        return [Unit(r["prompt_ids"], [_branch(r, "completion", i)]) for i, r in enumerate(rows)], b
    if "chosen_ids" in rows[0]:
        branches = [[_branch(r, "chosen", i), _branch(r, "rejected", b + i)] for i, r in enumerate(rows)]
    else:
        if "kl_completion_ids" not in rows[0]:
            raise ValueError("unpaired rows need their fixed mismatched completion 'kl_completion_ids' for KTO's "
                             "KL estimate: tokenize them with tokenize_rows(..., kl_completions=True)")
        branches = [[_branch(r, "completion", i), _branch(r, "kl_completion", b + i)] for i, r in enumerate(rows)]
    if prefix_sharing:
        units = [Unit(r["prompt_ids"], br) for r, br in zip(rows, branches)]
    else:  # chosen rows first, then rejected rows: the order a reader of the padded batch expects
        units = [Unit(r["prompt_ids"], [br[k]]) for k in range(2) for r, br in zip(rows, branches)]
    return units, 2 * b


def pack_units(units: list[Unit], capacity: int) -> list[list[Unit]]:
    """First-fit decreasing: fill rows of ``capacity`` tokens, longest units first."""
    rows: list[list[Unit]] = []
    room: list[int] = []
    for unit in sorted(units, key=len, reverse=True):
        for i, free in enumerate(room):
            if len(unit) <= free:
                rows[i].append(unit)
                room[i] -= len(unit)
                break
        else:
            rows.append([unit])
            room.append(capacity - len(unit))
    return rows


def build_batch(units: list[Unit], num_seqs: int, pad_token_id: int, packed: bool) -> dict[str, Tensor]:
    """Lay units out in rows and build ids, mask, positions and the explicit scoring arrays."""
    rows = pack_units(units, max(len(u) for u in units)) if packed else [[u] for u in units]
    width = max(sum(len(u) for u in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    unit_id = torch.full((n_rows, width), -1, dtype=torch.long)  # which unit a token belongs to (-1: pad)
    branch_id = torch.zeros((n_rows, width), dtype=torch.long)  # 0: prompt, k: k-th branch
    seq_scores: dict[int, tuple[list[int], list[int]]] = {}
    last_token: dict[int, int] = {}  # flat position of each sequence's last token (reward models read it)
    plain = all(len(u.branches) == 1 for u in units) and not packed

    unit_counter = 0
    for r, row in enumerate(rows):
        offset = 0
        for unit in row:
            p = len(unit.prompt)
            if p == 0:
                raise ValueError("a row has an empty prompt: the first completion token would have no predictor "
                                 "(use a tokenizer that adds BOS, or give every row a prompt)")
            input_ids[r, offset : offset + p] = torch.as_tensor(unit.prompt, dtype=torch.long)
            position_ids[r, offset : offset + p] = torch.arange(p)
            unit_id[r, offset : offset + p] = unit_counter
            start = offset + p
            for k, branch in enumerate(unit.branches, start=1):
                completion, seq, n = branch.completion, branch.seq, len(branch.completion)
                input_ids[r, start : start + n] = torch.as_tensor(completion, dtype=torch.long)
                position_ids[r, start : start + n] = torch.arange(p, p + n)
                unit_id[r, start : start + n] = unit_counter
                branch_id[r, start : start + n] = k
                # The last prompt token predicts the first completion token; each completion token the next.
                predictors = [offset + p - 1] + list(range(start, start + n - 1))
                scored = range(n) if branch.mask is None else _masked_positions(branch.mask, n)
                seq_scores[seq] = ([r * width + predictors[j] for j in scored], [completion[j] for j in scored])
                last_token[seq] = r * width + start + n - 1
                start += n
            offset = start
            unit_counter += 1

    order = sorted(seq_scores)
    assert order == list(range(num_seqs)), "every sequence must appear exactly once"
    score_index = torch.tensor([i for s in order for i in seq_scores[s][0]], dtype=torch.long)
    score_target = torch.tensor([t for s in order for t in seq_scores[s][1]], dtype=torch.long)
    seq_tokens = torch.tensor([len(seq_scores[s][1]) for s in order], dtype=torch.long)
    score_seq = torch.repeat_interleave(torch.arange(num_seqs), seq_tokens)
    seq_last_index = torch.tensor([last_token[s] for s in order], dtype=torch.long)

    real = unit_id >= 0
    if plain:
        attention_mask = real.long()
    else:
        same_unit = unit_id[:, :, None] == unit_id[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        # A key is visible if it is in the prompt or in the query's own branch.
        visible_branch = (branch_id[:, None, :] == 0) | (branch_id[:, None, :] == branch_id[:, :, None])
        allowed = same_unit & causal & visible_branch & real[:, :, None]
        # Padding queries attend to themselves only, so no softmax row is empty (SDPA would give NaN).
        allowed |= torch.eye(width, dtype=torch.bool)
        attention_mask = allowed[:, None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "score_index": score_index,
        "score_target": score_target,
        "score_seq": score_seq,
        "seq_tokens": seq_tokens,
        "seq_last_index": seq_last_index,
        "num_input_tokens": real.sum().reshape(1),
    }


def _masked_positions(mask: Sequence[bool], n: int) -> list[int]:
    if len(mask) != n:
        raise ValueError(f"a completion mask has {len(mask)} entries for {n} completion tokens")
    return [j for j, keep in enumerate(mask) if keep]


def _reference_columns(rows: Sequence[dict]) -> dict[str, Tensor]:
    return {
        name: torch.tensor([row[name] for row in rows], dtype=torch.float32) for name in REF_COLUMNS if name in rows[0]
    }


@dataclass
class PreferenceCollator:
    """Collate paired or unpaired tokenized rows; see the module docstring for the layouts."""

    pad_token_id: int
    prefix_sharing: bool = True
    padding_free: bool = False
    sft: bool = False  # SFT rows: the completion only, no mismatched KL branch
    extras: tuple[str, ...] = ()  # per-example float columns the run's loss reads, batched as [B] (row order)

    def describe(self) -> str:
        sharing = "prefix sharing" if self.prefix_sharing else "prompt repeated per completion"
        packing = "padding-free packing" if self.padding_free else "right padding"
        return f"{sharing}, {packing}"

    def groups(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
               group_size: int) -> dict[str, Tensor]:
        """One batch of sampled groups (RLOO, GRPO) in this collator's layout; see :func:`group_units`."""
        units = group_units(prompt_ids, completion_ids, group_size, self.prefix_sharing)
        return build_batch(units, len(completion_ids), self.pad_token_id, packed=self.padding_free)

    def __call__(self, rows: Sequence[dict]) -> dict[str, Tensor]:
        units, num_seqs = units_from_rows(rows, self.prefix_sharing, self.sft)
        batch = build_batch(units, num_seqs, self.pad_token_id, packed=self.padding_free)
        if "label" in rows[0]:
            batch["desirable"] = torch.tensor([bool(row["label"]) for row in rows])
        if SOURCE_ROW in rows[0]:  # where each example came from, for reports that name rows
            batch["source_rows"] = torch.tensor([row[SOURCE_ROW] for row in rows], dtype=torch.long)
        for name in self.extras:
            batch[name] = torch.tensor([row[name] for row in rows], dtype=torch.float32)
        return batch | _reference_columns(rows)


def group_units(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], group_size: int,
                prefix_sharing: bool) -> list[Unit]:
    """Units of sampled groups: completion ``k`` answers prompt ``k // group_size`` and is sequence ``k``. With
    ``prefix_sharing`` all completions of a prompt branch from one copy of it (the prompt is encoded once per
    group); without, one unit per completion."""
    if len(completion_ids) != len(prompt_ids) * group_size:
        raise ValueError(f"{len(completion_ids)} completions for {len(prompt_ids)} prompts × {group_size}")
    if prefix_sharing:
        return [Unit(prompt, [Branch(completion_ids[i * group_size + j], i * group_size + j)
                              for j in range(group_size)]) for i, prompt in enumerate(prompt_ids)]
    return [Unit(prompt_ids[k // group_size], [Branch(c, k)]) for k, c in enumerate(completion_ids)]


def pad_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> dict[str, Tensor]:
    """One right-padded row per ``prompt + completion`` (sequence i = row i), in the collators' format."""
    units = [Unit(p, [Branch(c, i)]) for i, (p, c) in enumerate(zip(prompts, completions))]
    return build_batch(units, len(units), pad_id, packed=False)


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Random order, but batches of similar length: shuffle, cut into mega-batches of ``batch_size × group``
    examples, sort each by length (longest first). Less padding in the padded layout, and the same order on
    every process (seeded by ``seed + epoch``), so it composes with data parallelism."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group: int = 50):
        self.lengths, self.mega, self.seed, self.epoch = list(lengths), batch_size * group, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        for start in range(0, len(order), self.mega):
            yield from sorted(order[start : start + self.mega], key=lambda i: -self.lengths[i])


def example_lengths(rows) -> list[int]:
    """Tokens of each tokenized row with the prompt counted once (what the batch layouts pay for)."""
    columns = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "kl_completion_ids")
               if c in rows.column_names]
    table = rows.select_columns(columns).with_format("arrow")[:]
    total = None
    for c in columns:
        lengths = table.column(c).combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        total = lengths if total is None else total + lengths
    return total.tolist()


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of as many examples as fit in a token budget, instead of a fixed number of examples.

    Batch b holds examples whose lengths (tokens with the prompt counted once, see :func:`example_lengths`)
    sum to at most the budget, ``Σ_{i∈b} len_i ≤ max_tokens``, or a single example longer than the budget on
    its own — nothing is dropped. Every step then costs about the same number of tokens, so memory and step
    time stay steady (a fixed batch size peaks on its longest batch), and batches of similar lengths pad
    little.

    The composition is fixed once from ``seed``: shuffle, cut into mega-chunks of about ``group`` batches'
    worth of tokens, sort each chunk by length (longest first) and fill batches greedily in that order, so
    the examples of a batch come from one chunk and have similar lengths. Each epoch reshuffles only the
    order of the batches (seeded by ``seed + epoch``): ``len()`` is the same in every epoch and on every
    process, which the schedule and data parallelism rely on.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0, group: int = 50):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens, self.seed, self.epoch = max_tokens, seed, 0
        self.over_budget = sum(length > max_tokens for length in lengths)  # each alone in its batch
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(lengths), generator=g).tolist()
        self.batches: list[list[int]] = []
        chunk: list[int] = []
        chunk_tokens = 0
        for i in order:
            chunk.append(i)
            chunk_tokens += lengths[i]
            if chunk_tokens >= group * max_tokens:
                self.batches += self._fill(chunk, lengths)
                chunk, chunk_tokens = [], 0
        if chunk:
            self.batches += self._fill(chunk, lengths)

    def _fill(self, chunk: list[int], lengths: Sequence[int]) -> list[list[int]]:
        """Next-fit over the chunk sorted longest first: a batch closes when the next example would not fit."""
        batches: list[list[int]] = []
        batch: list[int] = []
        used = 0
        for i in sorted(chunk, key=lambda i: -lengths[i]):
            if batch and used + lengths[i] > self.max_tokens:
                batches.append(batch)
                batch, used = [], 0
            batch.append(i)
            used += lengths[i]
        batches.append(batch)
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        for k in torch.randperm(len(self.batches), generator=g).tolist():
            yield list(self.batches[k])
