"""What rollout returns: one `Sample` per generated response, grouped per prompt in input order."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union


@dataclasses.dataclass
class Sample:
    prompt_index: int  # position of the prompt in the batch given to generate
    sample_index: int  # 0..n-1 within the prompt's group
    prompt_ids: list[int]  # prompt tokens as the engine saw them (image placeholders expanded)
    response_ids: list[int]  # generated tokens, the stop string's or EOS token included
    logprobs: list[float]  # log-prob of each response token under the engine's weights (see rollout.logprobs_mode)
    text: str  # decoded response (ends with the stop string when one stopped it)
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_response_tokens or the context) | "abort"
    stop_reason: Union[str, int, None]  # the stop string or token id that ended it; None for EOS or length
    weights_version: int  # version of the weights that generated it (set when a sender's update finishes)
    worker: int = 0  # rank of the rollout worker that generated it
    prompt_truncated: bool = False  # the prompt was cut to its last max_prompt_tokens tokens (on_long_prompt=truncate)
    row_id: Optional[str] = None  # the prompt's row id, when the caller gave one


@dataclasses.dataclass
class RolloutResult:
    samples: list[list[Sample]]  # per prompt, in input order: its n samples (empty for a skipped prompt)
    stats: dict  # counts and throughput (see RolloutWorker.generate / RolloutPool.generate)

    def flat(self) -> list[Sample]:
        """All samples, prompt by prompt, in input order."""
        return [s for group in self.samples for s in group]
