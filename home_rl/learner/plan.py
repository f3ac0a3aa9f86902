"""Micro-batch plans: which sequences each data-parallel rank gets, and how a rank packs them into rows and
micro-batches.

The driver plans every rank's micro-batches once (`split_for_ranks`, `plan_micro_batches`) and sends each
rank its plan with its sequences; the rank checks the plan against them (`check_plan`) and runs exactly
`count` micro-batches (`micro_batches`, masked-out fillers after the plan's), the same number on every
rank, as ZeRO-3's collectives need. A plan is a list of micro-batches, each a list of rows, each a list
of indices into the rank's sequences: one sequence a row, or with `learner.shared_prefix` the samples
of one prompt in one row.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional

import torch

from home_rl.learner.batch import Sequence

def prefix_key(seq: Sequence, digests: Optional[dict] = None) -> tuple:
    """Sequences with equal keys can share a row: the same prompt tokens, images, route and router prompt."""
    images = None
    if seq.mm_inputs:
        pixels = seq.mm_inputs["pixel_values"]
        cache = digests if digests is not None else {}
        if id(pixels) not in cache:  # the samples of a prompt usually hold the very same tensors
            h = hashlib.blake2b(digest_size=16)
            for name in sorted(seq.mm_inputs):
                t = seq.mm_inputs[name].detach().contiguous().cpu()
                h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            cache[id(pixels)] = (h.hexdigest(), pixels)  # the tensor kept alive: its id stays unique
        images = cache[id(pixels)][0]
    return (seq.route, tuple(seq.prompt_ids), images, tuple(seq.mm_token_type_ids or ()),
            tuple(seq.router_prompt_ids or ()))


def row_length(seqs: list[Sequence], row: list[int]) -> int:
    """Tokens of a packed row: its prompt once plus every response."""
    return len(seqs[row[0]].prompt_ids) + sum(len(seqs[i].response_ids) for i in row)


def plan_rows(seqs: list[Sequence], shared: bool, max_sequences: int = 0, max_tokens: int = 0) -> list[list[int]]:
    """The rows of the forward passes, as indices into seqs: one sequence each, or (shared) the sequences
    of one prompt, in order, a row holding at most `max_sequences` of them and, beyond its first,
    no more than `max_tokens` tokens (0: no limit)."""
    if not shared:
        return [[i] for i in range(len(seqs))]
    by_key: dict[tuple, list[int]] = {}
    digests: dict = {}
    for i, s in enumerate(seqs):
        by_key.setdefault(prefix_key(s, digests), []).append(i)
    rows: list[list[int]] = []
    for members in by_key.values():
        row: list[int] = []
        for i in members:
            full = max_sequences and len(row) >= max_sequences
            if row and (full or (max_tokens and row_length(seqs, row + [i]) > max_tokens)):
                rows.append(row)
                row = []
            row.append(i)
        rows.append(row)
    return rows


def split_for_ranks(seqs: list[Sequence], world_size: int, shared: bool = False) -> list[list[int]]:
    """Indices of the sequences each data-parallel rank gets: similar token counts per rank.

    Units are sequences, or (shared) the sequences of one prompt, kept on one rank so they share it;
    while there are fewer units than ranks, the largest is halved. Longest unit first, each to the
    rank with the fewest tokens so far (ties: the lower rank).
    """
    if len(seqs) < world_size:
        raise ValueError(f"a batch of {len(seqs)} sequences cannot be split over {world_size} learners")
    units = plan_rows(seqs, shared)
    while len(units) < world_size:
        units.sort(key=len)
        big = units.pop()
        units += [big[:len(big) // 2], big[len(big) // 2:]]
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for unit in sorted(units, key=lambda u: -row_length(seqs, u)):
        rank = min(range(world_size), key=lambda r: (loads[r], len(shards[r])))
        shards[rank].extend(unit)
        loads[rank] += row_length(seqs, unit)
    return [sorted(s) for s in shards]


def plan_micro_batches(seqs: list[Sequence], micro_batch_size: int, max_tokens: int = 0,
                       shared: bool = False) -> list[list[list[int]]]:
    """The micro-batches, each a list of rows (indices into seqs), shortest rows first (sorting cuts padding).

    A micro-batch holds at most `micro_batch_size` sequences. `max_tokens` > 0 packs by tokens instead:
    as many rows as fit in `max_tokens` once padded to the longest (rows x longest, what the forward
    pass allocates), so memory is bounded by tokens whatever the lengths; a row longer than the budget
    runs alone. Shared rows count their prompt once.
    """
    if max_tokens > 0:
        rows = plan_rows(seqs, shared, max_tokens=max_tokens)
    else:
        rows = plan_rows(seqs, shared, max_sequences=micro_batch_size)

    def fits(chunk: list[list[int]], row: list[int]) -> bool:  # rows come shortest first: `row` is the longest
        if max_tokens > 0:
            return (len(chunk) + 1) * row_length(seqs, row) <= max_tokens
        return sum(len(r) for r in chunk) + len(row) <= micro_batch_size

    chunks: list[list[list[int]]] = []
    for row in sorted(rows, key=lambda r: row_length(seqs, r)):
        if chunks and fits(chunks[-1], row):
            chunks[-1].append(row)
        else:
            chunks.append([row])
    return chunks


@dataclasses.dataclass
class PlannedMicroBatch:
    indices: list[int]  # into the shard, in the order of `sequences` (empty: a filler with nothing in the loss)
    rows: list[list[Sequence]]  # the packed rows: one sequence each, or the sequences that share a prompt

    @property
    def sequences(self) -> list[Sequence]:
        return [s for row in self.rows for s in row]


def check_plan(seqs: list[Sequence], plan: list[list[list[int]]], count: int, micro_batch_size: int,
               max_tokens: int = 0, shared: bool = False) -> Optional[str]:
    """What is wrong with `plan` (micro-batches of rows of indices into seqs) for these sequences, or None: every
    sequence exactly once, at most `count` micro-batches, rows of one prompt (unshared: one sequence each), and
    micro-batches within the size or token budget (a row over the budget alone)."""
    used = sorted(i for rows in plan for row in rows for i in row)
    if used != list(range(len(seqs))):
        missing = sorted(set(range(len(seqs))) - set(used))
        extra = sorted({i for i in used if not 0 <= i < len(seqs)} | {i for i in used if used.count(i) > 1})
        return (f"it covers sequences {used[:8]}{'...' if len(used) > 8 else ''} of a shard of {len(seqs)} "
                f"(missing {missing[:8]}, out of range or repeated {extra[:8]})")
    if len(plan) > count:
        return f"it has {len(plan)} micro-batches, more than the {count} every rank runs"
    for m, rows in enumerate(plan):
        for row in rows:
            if len(row) > 1 and (not shared or len({prefix_key(seqs[i]) for i in row}) > 1):
                return (f"micro-batch {m} packs sequences {row} into one row, which "
                        + ("needs learner.shared_prefix" if not shared else "do not share one prompt"))
        longest = max(row_length(seqs, row) for row in rows)
        if max_tokens > 0 and len(rows) > 1 and len(rows) * longest > max_tokens:
            return f"micro-batch {m} pads to {len(rows)} x {longest} tokens, above the budget of {max_tokens}"
        if max_tokens <= 0 and sum(len(row) for row in rows) > micro_batch_size:
            return f"micro-batch {m} holds {sum(len(row) for row in rows)} sequences, above {micro_batch_size}"
    return None


def micro_batches(seqs: list[Sequence], plan: list[list[list[int]]], count: int) -> list[PlannedMicroBatch]:
    """Exactly `count` micro-batches: those of the plan (checked by `check_plan`), then fillers.

    Under ZeRO-3 every rank must run the same number of forward/backward passes, so a rank with
    fewer sequences fills up with masked-out copies (nothing in the loss). Losses are normalised by
    the whole step's token and sequence counts, so how sequences are grouped changes no loss or gradient.
    """
    out = [PlannedMicroBatch([i for row in rows for i in row], [[seqs[i] for i in row] for row in rows])
           for rows in plan]
    shortest = min(range(len(seqs)), key=lambda i: len(seqs[i]))
    while len(out) < count:
        out.append(PlannedMicroBatch([], [[seqs[shortest].masked_out()]]))
    return out
