"""A plan's result: each actor's predicted peak against what it gets, the advice, and how it prints."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class ActorPlan:
    role: str  # learner | rollout | reward | driver | router trainer | host node N
    count: int  # how many such actors
    device: str  # cpu | cuda | host (a node's RAM)
    predicted_gib: float  # the peak of one of them
    available_gib: float  # what one of them may use: USABLE of a GPU, or of its node's RAM
    parts: dict[str, float]  # GiB per part of the prediction (weights, gradients, optimizer, activations, ...)

    @property
    def fits(self) -> bool:
        return self.predicted_gib <= self.available_gib

    def row(self) -> dict:
        return {"role": self.role, "count": self.count, "device": self.device,
                "predicted_gib": round(self.predicted_gib, 2), "available_gib": round(self.available_gib, 2),
                "fits": self.fits}


@dataclasses.dataclass
class MemoryPlan:
    actors: list[ActorPlan]
    advice: list[str]  # what would make it fit, per actor that does not (empty when everything fits)
    zero_stage: Optional[int] = None  # the learners' ZeRO stage the plan is for
    problems: list[str] = dataclasses.field(default_factory=list)  # lengths that cannot work (always refusals)
    notes: list[str] = dataclasses.field(default_factory=list)  # what was not planned, and why

    @property
    def fits(self) -> bool:
        return not self.problems and all(a.fits for a in self.actors)

    def refusal(self) -> Optional[str]:
        """One line: the first actor (or length) that cannot fit, predicted vs available, and the knobs."""
        if self.problems:
            return self.problems[0]
        for actor, advice in zip([a for a in self.actors if not a.fits], self.advice):
            return (f"memory plan: {actor.role} needs {actor.predicted_gib:.1f} GiB but has {actor.available_gib:.1f} "
                    f"GiB ({actor.device}); {advice}")
        return None

    def to_json(self) -> dict:
        return {"fits": self.fits, "zero_stage": self.zero_stage, "actors": [a.row() for a in self.actors],
                "advice": self.problems + self.advice, "notes": self.notes}

    def table(self) -> str:
        lines = [f"{'actor':<18} {'count':>5} {'device':<6} {'predicted GiB':>13} {'available GiB':>13}  fits  parts"]
        for a in self.actors:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in a.parts.items() if v >= 0.005)
            lines.append(f"{a.role:<18} {a.count:>5} {a.device:<6} {a.predicted_gib:>13.2f} {a.available_gib:>13.2f}  "
                         f"{'yes' if a.fits else 'NO ':<4}  {parts}")
        return "\n".join(lines + [f"advice: {x}" for x in self.problems + self.advice] + [f"note: {x}" for x in self.notes])
