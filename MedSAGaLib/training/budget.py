"""How long to train when the user gave no step count: a time budget, and patience on held-out slices.

Torch-free decision logic, so it can be tested on its own and shown in any front end. The trainer
measures the first steps, plans how many steps fit in what is left of the time budget (capped by
``max_steps``; the learning-rate schedule follows the plan), validates every ``val_every`` steps,
and stops when the mean validation Dice has not improved by ``min_delta`` for ``patience`` checks
in a row, or when the budget is spent. Every decision is kept as a sentence in ``decisions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

PROBE_STEPS = 3  # steps timed before the plan is made
# ...and the plan is made again from this many: the first steps' time is a rough guess (measured on 2 CPU
# cores: 0.94 s per step over the probe, 0.86 s over the run, so a plan from the probe left 17 s unused)
REPLAN_STEPS = 20
# ...and once more from the steps after those, which run at the steady rate: a bf16 GaLore run on 2 CPU cores
# took 1.21 s per step over its first 20 and 0.96 s after, so its plan from step 20 left 46 s of 240 s unused
LATE_REPLAN_STEPS = 60


@dataclass
class StepBudget:
    time_budget: float  # seconds for the whole run, preparation included
    max_steps: int
    min_steps: int = 40
    patience: int = 3  # validation checks without improvement before stopping
    min_delta: float = 0.005  # mean Dice gain that counts as improvement
    val_every: int = 20
    planned_steps: int = 0
    best_score: float = -math.inf
    best_step: int = 0
    checks_without_gain: int = 0
    stop_reason: Optional[str] = None
    plans_made: int = 0
    decisions: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.planned_steps = self.planned_steps or self.max_steps  # until the first steps are timed

    def plan(self, elapsed: float, seconds_per_step: float, steps_done: int, validation_seconds: float = 0.0) -> int:
        """Steps to plan for, from the time left and the measured cost of a step (and of a validation).
        Called again later in the run, it re-plans from the longer measurement."""
        left = max(0.0, self.time_budget - elapsed)
        per_step = max(1e-6, seconds_per_step + validation_seconds / max(1, self.val_every))
        fit = steps_done + int(left / per_step)
        self.planned_steps = max(steps_done + 1, min(self.max_steps, fit))
        why = "the step cap" if fit >= self.max_steps else f"the time budget of {self.time_budget:.0f} s"
        again = self.plans_made > 0
        self.plans_made += 1
        spent = f"{elapsed:.0f} s spent after {steps_done} steps" if again else f"{elapsed:.0f} s spent preparing and probing"
        self.decisions.append(
            f"{'re-planned' if again else 'planned'} {self.planned_steps} steps ({seconds_per_step:.2f} s per step "
            f"measured, {spent}; limited by {why})")
        return self.planned_steps

    def observe(self, step: int, score: float) -> None:
        """A validation result (mean Dice) at ``step``; may set ``stop_reason``."""
        if not math.isnan(score) and score > self.best_score + self.min_delta:
            self.best_score, self.best_step, self.checks_without_gain = score, step, 0
            return
        if not math.isnan(score) and score > self.best_score:
            self.best_score, self.best_step = score, step  # kept, but too small a gain to reset patience
        self.checks_without_gain += 1
        if self.checks_without_gain >= self.patience and step >= self.min_steps:
            self.stop_reason = (f"validation Dice stopped improving: no gain of {self.min_delta} in {self.patience} checks "
                                f"({self.patience * self.val_every} steps) after step {self.best_step} "
                                f"(best mean {self.best_score:.3f})")

    def out_of_time(self, elapsed: float, seconds_per_step: float) -> bool:
        """True (and ``stop_reason`` set) when one more step would overrun the budget."""
        if elapsed + seconds_per_step > self.time_budget:
            self.stop_reason = f"time budget of {self.time_budget:.0f} s reached ({elapsed:.0f} s spent)"
            return True
        return False

    def finished(self, step: int) -> bool:
        if self.stop_reason is None and step >= self.planned_steps:
            self.stop_reason = f"reached the planned {self.planned_steps} steps"
        return self.stop_reason is not None


__all__ = ["StepBudget", "PROBE_STEPS", "REPLAN_STEPS", "LATE_REPLAN_STEPS"]
