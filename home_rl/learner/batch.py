"""What the learner trains on: sequences (prompt + response), packed into padded micro-batches.

A `Sequence` is one prompt with one response, plus everything a loss needs per response token
(`token_data`: advantages, old log-probs, ...) or per sequence (`seq_data`). Sequences travel to
the learner actors as they are; each actor pads its own micro-batches. Padding is on the right,
so position ids stay 0..n-1 for every model (Qwen2.5-VL's 3D rope included). Logits are computed
only from the first response position of a micro-batch onwards (`logits_to_keep`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch


@dataclasses.dataclass
class Sequence:
    prompt_ids: list[int]  # the rendered prompt (image placeholders expanded for the learner)
    response_ids: list[int]  # the response tokens that log-probs and losses are about
    route: Optional[str] = None  # the expert this sequence runs on (HOME models; None: the model's default)
    loss_mask: Optional[list[float]] = None  # per response token, 1 = counts in the loss (None: every token)
    token_data: dict = dataclasses.field(default_factory=dict)  # name -> one value per response token
    seq_data: dict = dataclasses.field(default_factory=dict)  # name -> one value per sequence
    router_label: Optional[int] = None  # target expert index (0 fast, 1 think) for the router's cross-entropy
    router_prompt_ids: Optional[list[int]] = None  # the prompt as the router sees it (None: prompt_ids)
    router_mm_token_type_ids: Optional[list[int]] = None  # image-token flags of router_prompt_ids
    mm_inputs: dict = dataclasses.field(default_factory=dict)  # pixel_values [patches, dim], image_grid_thw [images, 3]
    mm_token_type_ids: Optional[list[int]] = None  # 1 at image tokens of prompt_ids (Qwen2.5-VL)

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if self.loss_mask is not None and len(self.loss_mask) != len(self.response_ids):
            raise ValueError(f"loss_mask has {len(self.loss_mask)} entries for {len(self.response_ids)} response tokens")
        for name, values in self.token_data.items():
            if len(values) != len(self.response_ids):
                raise ValueError(f"token_data[{name!r}] has {len(values)} entries for {len(self.response_ids)} response tokens")

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def num_loss_tokens(self) -> float:
        return float(len(self.response_ids) if self.loss_mask is None else sum(self.loss_mask))

    def masked_out(self) -> "Sequence":
        """This sequence with nothing in the loss: a filler micro-batch for a rank with fewer sequences."""
        return dataclasses.replace(self, loss_mask=[0.0] * len(self.response_ids), router_label=None)


@dataclasses.dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    router_input_ids: torch.Tensor  # [B, Tr] the prompts as the router sees them, right-padded
    router_attention_mask: torch.Tensor  # [B, Tr]
    keep: int  # logits are kept for the last `keep` positions (logits_to_keep)
    targets: torch.Tensor  # [B, keep] the token each kept position predicts (0 where unused)
    response_mask: torch.Tensor  # [B, keep] 1 where the kept position predicts a response token
    loss_mask: torch.Tensor  # [B, keep] float, response_mask times each sequence's loss mask
    token_data: dict  # name -> [B, keep] float
    seq_data: dict  # name -> [B]
    routes: Optional[list]  # expert name per row, or None
    router_labels: torch.Tensor  # [B] long, -1 = no label
    mm_inputs: dict  # concatenated pixel_values / image_grid_thw, mm_token_type_ids [B, T]
    response_lengths: list[int]

    def router_inputs(self) -> dict[str, Any]:
        mm = {k: v for k, v in self.mm_inputs.items() if k != "mm_token_type_ids"}
        if "router_mm_token_type_ids" in self.mm_inputs:
            mm["mm_token_type_ids"] = self.mm_inputs["router_mm_token_type_ids"]
        return {"input_ids": self.router_input_ids, "attention_mask": self.router_attention_mask, "use_cache": False, **mm}

    def model_inputs(self) -> dict[str, Any]:
        mm = {k: v for k, v in self.mm_inputs.items() if k != "router_mm_token_type_ids"}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "logits_to_keep": self.keep,
                "use_cache": False, **mm}

    def to(self, device: torch.device) -> "MicroBatch":
        def move(x):
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x.to(device) if isinstance(x, torch.Tensor) else x

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def per_sequence(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Split a [B, keep] tensor into each row's response-token values (in response order)."""
        out = []
        for row, n in enumerate(self.response_lengths):
            positions = self.response_mask[row].nonzero().squeeze(1)
            assert len(positions) == n
            out.append(values[row, positions])
        return out


def collate(seqs: list[Sequence], pad_id: int) -> MicroBatch:
    """Pad sequences on the right into one micro-batch; align targets with the kept logit positions."""
    lengths = [len(s) for s in seqs]
    total = max(lengths)
    # Logit position p predicts token p + 1: the first response token of row i is predicted at P_i - 1.
    first = min(len(s.prompt_ids) for s in seqs) - 1
    keep = total - first
    B = len(seqs)
    input_ids = torch.full((B, total), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, total), dtype=torch.long)
    targets = torch.zeros((B, keep), dtype=torch.long)
    response_mask = torch.zeros((B, keep), dtype=torch.bool)
    loss_mask = torch.zeros((B, keep), dtype=torch.float32)
    names = sorted({k for s in seqs for k in s.token_data})
    token_data = {k: torch.zeros((B, keep), dtype=torch.float32) for k in names}
    has_types = any(s.mm_token_type_ids is not None for s in seqs)
    types = torch.zeros((B, total), dtype=torch.long) if has_types else None
    for i, s in enumerate(seqs):
        P, R = len(s.prompt_ids), len(s.response_ids)
        input_ids[i, :P + R] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attention_mask[i, :P + R] = 1
        span = slice(P - 1 - first, P - 1 - first + R)
        targets[i, span] = torch.tensor(s.response_ids, dtype=torch.long)
        response_mask[i, span] = True
        loss_mask[i, span] = torch.tensor(s.loss_mask if s.loss_mask is not None else [1.0] * R, dtype=torch.float32)
        for k in names:
            if k in s.token_data:
                token_data[k][i, span] = torch.as_tensor(s.token_data[k], dtype=torch.float32)
        if types is not None and s.mm_token_type_ids is not None:
            types[i, :P] = torch.tensor(s.mm_token_type_ids, dtype=torch.long)
    seq_names = sorted({k for s in seqs for k in s.seq_data})
    seq_data = {k: torch.tensor([float(s.seq_data.get(k, 0.0)) for s in seqs]) for k in seq_names}
    mm: dict[str, Any] = {}
    with_images = [s.mm_inputs for s in seqs if s.mm_inputs]
    if with_images:
        mm = {k: torch.cat([m[k] for m in with_images]) for k in ("pixel_values", "image_grid_thw")}
    if types is not None:
        mm["mm_token_type_ids"] = types
    router_prompts = [s.router_prompt_ids or s.prompt_ids for s in seqs]
    router_len = max(len(p) for p in router_prompts)
    router_input_ids = torch.zeros((B, router_len), dtype=torch.long)
    router_attention_mask = torch.zeros((B, router_len), dtype=torch.long)
    for i, ids in enumerate(router_prompts):
        router_input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        router_attention_mask[i, :len(ids)] = 1
    if types is not None:
        router_types = torch.zeros((B, router_len), dtype=torch.long)
        for i, s in enumerate(seqs):
            flags = s.router_mm_token_type_ids if s.router_prompt_ids else s.mm_token_type_ids
            if flags is not None:
                router_types[i, :len(flags)] = torch.tensor(flags, dtype=torch.long)
        mm["router_mm_token_type_ids"] = router_types
    routes = [s.route for s in seqs]
    return MicroBatch(
        input_ids=input_ids, attention_mask=attention_mask, router_input_ids=router_input_ids,
        router_attention_mask=router_attention_mask, keep=keep, targets=targets,
        response_mask=response_mask, loss_mask=loss_mask, token_data=token_data, seq_data=seq_data,
        routes=None if all(r is None for r in routes) else routes,
        router_labels=torch.tensor([-1 if s.router_label is None else s.router_label for s in seqs]),
        mm_inputs=mm, response_lengths=[len(s.response_ids) for s in seqs])


def split_for_ranks(seqs: list[Sequence], world_size: int) -> list[list[int]]:
    """Indices of the sequences each data-parallel rank gets: similar token counts per rank.

    Longest first, each to the rank with the fewest tokens so far (ties: the lower rank).
    """
    if len(seqs) < world_size:
        raise ValueError(f"a batch of {len(seqs)} sequences cannot be split over {world_size} learners")
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
        rank = min(range(world_size), key=lambda r: (loads[r], len(shards[r])))
        shards[rank].append(i)
        loads[rank] += len(seqs[i])
    return [sorted(s) for s in shards]


def plan_micro_batches(seqs: list[Sequence], micro_batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices of each micro-batch, shortest sequences first (sorting by length cuts padding).

    `max_tokens` > 0 packs by tokens instead of by count: a micro-batch holds as many sequences as
    fit in `max_tokens` once padded to its longest (rows x longest, what the forward pass allocates),
    so memory is bounded by tokens whatever the lengths; a sequence longer than the budget runs alone.
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    if max_tokens <= 0:
        return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    chunks: list[list[int]] = []
    for i in order:  # ascending: the newest sequence is the longest, so the padded size is rows x its length
        if chunks and (len(chunks[-1]) + 1) * len(seqs[i]) <= max_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def micro_batches(seqs: list[Sequence], micro_batch_size: int, count: int,
                  max_tokens: int = 0) -> list[tuple[list[int], list[Sequence]]]:
    """Exactly `count` micro-batches of (indices into seqs, sequences), as `plan_micro_batches` packs them.

    Under ZeRO-3 every rank must run the same number of forward/backward passes, so a rank with
    fewer sequences fills up with masked-out copies (nothing in the loss). Losses are normalised by
    the whole step's token and sequence counts, so how sequences are grouped changes no loss or gradient.
    """
    chunks = plan_micro_batches(seqs, micro_batch_size, max_tokens)
    if len(chunks) > count:
        raise ValueError(f"{len(seqs)} sequences need {len(chunks)} micro-batches, more than the {count} asked for")
    out = [(idx, [seqs[i] for i in idx]) for idx in chunks]
    shortest = min(range(len(seqs)), key=lambda i: len(seqs[i]))
    while len(out) < count:
        out.append(([], [seqs[shortest].masked_out()]))
    return out
