"""What the learner trains on: sequences (prompt + response), packed into padded micro-batches.

A `Sequence` is one prompt with one response, plus everything a loss needs per response token
(`token_data`: advantages, old log-probs, ...) or per sequence (`seq_data`). Sequences travel to
the learner actors as they are, with the micro-batch plan the driver made for each rank
(home_rl/learner/plan.py); each actor pads what its plan says. A micro-batch is a list of rows: one sequence a row (`collate`), or with
`learner.shared_prefix` the samples of one prompt in one row (`collate_shared`, below). Padding is
on the right, so position ids stay 0..n-1 for every model (Qwen2.5-VL's 3D rope included).
Logits are computed only from the first response position of a micro-batch onwards (`logits_to_keep`).
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
    tokens: int  # tokens the forward pass computes (padding aside)
    # Shared-prefix rows only (collate_shared); the per-token tensors above are then per sequence, [S, K].
    position_ids: Optional[torch.Tensor] = None  # [B, T] text positions: responses continue from the prompt
    prompt_lengths: Optional[torch.Tensor] = None  # [B]
    seq_rows: Optional[torch.Tensor] = None  # [S] the row of each sequence
    seq_positions: Optional[torch.Tensor] = None  # [S, K] the kept logit position predicting each response token

    def router_inputs(self) -> dict[str, Any]:
        mm = {k: v for k, v in self.mm_inputs.items() if k != "mm_token_type_ids"}
        if "router_mm_token_type_ids" in self.mm_inputs:
            mm["mm_token_type_ids"] = self.mm_inputs["router_mm_token_type_ids"]
        return {"input_ids": self.router_input_ids, "attention_mask": self.router_attention_mask, "use_cache": False, **mm}

    def per_sequence_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values [B, ...] (e.g. router logits) as per-sequence ones [S, ...]: shared rows hold several."""
        return values if self.seq_rows is None else values[self.seq_rows.to(values.device)]

    def model_inputs(self) -> dict[str, Any]:
        mm = {k: v for k, v in self.mm_inputs.items() if k != "router_mm_token_type_ids"}
        extra = {} if self.position_ids is None else {"position_ids": self.position_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "logits_to_keep": self.keep,
                "use_cache": False, **extra, **mm}

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
    per_token = _PerToken.empty(seqs, keep)
    has_types = any(s.mm_token_type_ids is not None for s in seqs)
    types = torch.zeros((B, total), dtype=torch.long) if has_types else None
    for i, s in enumerate(seqs):
        P, R = len(s.prompt_ids), len(s.response_ids)
        input_ids[i, :P + R] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attention_mask[i, :P + R] = 1
        per_token.fill(i, P - 1 - first, s)
        if types is not None and s.mm_token_type_ids is not None:
            types[i, :P] = torch.tensor(s.mm_token_type_ids, dtype=torch.long)
    seq_names = sorted({k for s in seqs for k in s.seq_data})
    seq_data = {k: torch.tensor([float(s.seq_data.get(k, 0.0)) for s in seqs]) for k in seq_names}
    mm, router_input_ids, router_attention_mask = _prompt_inputs(seqs, types)
    routes = [s.route for s in seqs]
    return MicroBatch(
        input_ids=input_ids, attention_mask=attention_mask, router_input_ids=router_input_ids,
        router_attention_mask=router_attention_mask, keep=keep, **vars(per_token), seq_data=seq_data,
        routes=None if all(r is None for r in routes) else routes,
        router_labels=torch.tensor([-1 if s.router_label is None else s.router_label for s in seqs]),
        mm_inputs=mm, response_lengths=[len(s.response_ids) for s in seqs], tokens=sum(lengths))


@dataclasses.dataclass
class _PerToken:
    """A micro-batch's per-response-token tensors [rows, width], filled a sequence at a time."""
    targets: torch.Tensor  # long: the token each position predicts
    response_mask: torch.Tensor  # bool: the position predicts a response token
    loss_mask: torch.Tensor  # float: ... and counts in the loss
    token_data: dict  # name -> float

    @classmethod
    def empty(cls, seqs: list[Sequence], width: int) -> "_PerToken":
        shape = (len(seqs), width)
        names = sorted({k for s in seqs for k in s.token_data})
        return cls(torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.bool),
                   torch.zeros(shape, dtype=torch.float32), {k: torch.zeros(shape, dtype=torch.float32) for k in names})

    def fill(self, row: int, start: int, s: Sequence) -> None:
        """Sequence `s`'s response tokens at positions start.. of `row`."""
        span = slice(start, start + len(s.response_ids))
        self.targets[row, span] = torch.tensor(s.response_ids, dtype=torch.long)
        self.response_mask[row, span] = True
        self.loss_mask[row, span] = torch.tensor(s.loss_mask if s.loss_mask is not None else [1.0] * len(s.response_ids),
                                                 dtype=torch.float32)
        for name, values in s.token_data.items():
            self.token_data[name][row, span] = torch.as_tensor(values, dtype=torch.float32)


def _prompt_inputs(heads: list[Sequence], types: Optional[torch.Tensor]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """What each row's prompt brings, from the row's first sequence: its images (pixel_values and
    image_grid_thw concatenated, images in row order), the image-token flags `types` [B, T], and the prompt
    as the router sees it (input ids and attention mask, right-padded, with their own flags)."""
    B = len(heads)
    mm: dict[str, Any] = {}
    with_images = [s.mm_inputs for s in heads if s.mm_inputs]
    if with_images:
        mm = {k: torch.cat([m[k] for m in with_images]) for k in ("pixel_values", "image_grid_thw")}
    if types is not None:
        mm["mm_token_type_ids"] = types
    router_prompts = [s.router_prompt_ids or s.prompt_ids for s in heads]
    router_len = max(len(p) for p in router_prompts)
    router_input_ids = torch.zeros((B, router_len), dtype=torch.long)
    router_attention_mask = torch.zeros((B, router_len), dtype=torch.long)
    for i, ids in enumerate(router_prompts):
        router_input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        router_attention_mask[i, :len(ids)] = 1
    if types is not None:
        router_types = torch.zeros((B, router_len), dtype=torch.long)
        for i, s in enumerate(heads):
            flags = s.router_mm_token_type_ids if s.router_prompt_ids else s.mm_token_type_ids
            if flags is not None:
                router_types[i, :len(flags)] = torch.tensor(flags, dtype=torch.long)
        mm["router_mm_token_type_ids"] = router_types
    return mm, router_input_ids, router_attention_mask


# ----------------------------------------------------------------------------- shared prefixes
#
# With learner.shared_prefix the samples of one prompt form one row: the prompt once, then each
# response. A response attends to the prompt and to its own earlier tokens only, and its positions
# continue from the prompt's, so every response token sees exactly what it sees in its own
# sequence: log-probs, losses and gradients are those of the unshared rows, the prompt's tokens
# (and its images) are computed once instead of n times.


def collate_shared(rows: list[list[Sequence]], pad_id: int) -> MicroBatch:
    """Pack each row (sequences of one prompt) as prompt + response 1 + ... + response n, right-padded.

    The attention mask is 4D ([B, 1, T, T], True = attends): a prompt token sees the prompt's earlier
    tokens, a response token the whole prompt and its own response's earlier tokens. Position ids
    continue from the prompt in every response. Per-token tensors are per sequence ([S, K], response
    token k of sequence s predicted at kept logit `seq_positions[s, k]` of row `seq_rows[s]`).
    """
    seqs = [s for row in rows for s in row]
    for row in rows:
        if any(s.prompt_ids != row[0].prompt_ids for s in row):
            raise ValueError("the sequences of a shared row must have the same prompt")
    B, S = len(rows), len(seqs)
    prompt_lengths = [len(row[0].prompt_ids) for row in rows]
    lengths = [p + sum(len(s.response_ids) for s in row) for p, row in zip(prompt_lengths, rows)]
    total = max(lengths)
    first = min(prompt_lengths) - 1  # the earliest position that predicts a response token
    keep = total - first
    K = max(1, max(len(s.response_ids) for s in seqs))
    input_ids = torch.full((B, total), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, total), dtype=torch.long)
    segment = torch.full((B, total), -1, dtype=torch.long)  # 0 prompt, j + 1 response j of the row, -1 padding
    seq_rows = torch.zeros(S, dtype=torch.long)
    seq_positions = torch.zeros((S, K), dtype=torch.long)
    per_token = _PerToken.empty(seqs, K)
    has_types = any(s.mm_token_type_ids is not None for s in seqs)
    types = torch.zeros((B, total), dtype=torch.long) if has_types else None
    i = 0
    for b, row in enumerate(rows):
        P = prompt_lengths[b]
        input_ids[b, :P] = torch.tensor(row[0].prompt_ids, dtype=torch.long)
        position_ids[b, :P] = torch.arange(P)
        segment[b, :P] = 0
        if types is not None and row[0].mm_token_type_ids is not None:
            types[b, :P] = torch.tensor(row[0].mm_token_type_ids, dtype=torch.long)
        start = P
        for j, s in enumerate(row):
            R = len(s.response_ids)
            input_ids[b, start:start + R] = torch.tensor(s.response_ids, dtype=torch.long)
            position_ids[b, start:start + R] = torch.arange(P, P + R)
            segment[b, start:start + R] = j + 1
            # token 0 is predicted by the prompt's last position, token k > 0 by the response's token k - 1
            predicted_at = torch.tensor([P - 1] + list(range(start, start + R - 1)), dtype=torch.long)[:R]
            seq_rows[i] = b
            seq_positions[i, :R] = predicted_at - first
            per_token.fill(i, 0, s)
            start += R
            i += 1
    causal = torch.ones((total, total), dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    # Padding queries see themselves (never an empty row: sdpa would give NaN); nothing sees padding keys.
    attention_mask = (causal & ((key == 0) | (key == query)))[:, None]
    seq_data = {k: torch.tensor([float(s.seq_data.get(k, 0.0)) for s in seqs]) for k in sorted(
        {k for s in seqs for k in s.seq_data})}
    mm, router_input_ids, router_attention_mask = _prompt_inputs([row[0] for row in rows], types)
    routes = [row[0].route for row in rows]
    return MicroBatch(
        input_ids=input_ids, attention_mask=attention_mask, router_input_ids=router_input_ids,
        router_attention_mask=router_attention_mask, keep=keep, **vars(per_token), seq_data=seq_data,
        routes=None if all(r is None for r in routes) else routes,
        router_labels=torch.tensor([-1 if s.router_label is None else s.router_label for s in seqs]),
        mm_inputs=mm, response_lengths=[len(s.response_ids) for s in seqs], tokens=sum(lengths),
        position_ids=position_ids, prompt_lengths=torch.tensor(prompt_lengths), seq_rows=seq_rows,
        seq_positions=seq_positions)
