"""Which steps of a build run and which come from the cache (pure: no files, no processes).

Each step's key is its parent's key plus the step itself (and the hash of its files), so
keys are known before anything runs. A build reuses the longest prefix of steps whose
results are cached; a forced step, and every step after it, runs again, as on E2B.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coppice.images.spec import Step, step_key


@dataclass(frozen=True)
class PlannedStep:
    #: E2B's step name: "1" for the first step after the base
    number: str
    step: Step
    key: str
    cached: bool


@dataclass(frozen=True)
class BuildPlan:
    base_key: str
    steps: tuple[PlannedStep, ...]

    @property
    def final_key(self) -> str:
        return self.steps[-1].key if self.steps else self.base_key

    @property
    def to_run(self) -> tuple[PlannedStep, ...]:
        return tuple(s for s in self.steps if not s.cached)


def plan_build(
    base_key: str,
    steps: Sequence[Step],
    is_cached: Callable[[str], bool],
    force: bool = False,
) -> BuildPlan:
    planned: list[PlannedStep] = []
    parent = base_key
    reuse = not force
    for index, step in enumerate(steps, start=1):
        key = step_key(parent, step)
        if step.force:
            reuse = False
        cached = reuse and is_cached(key)
        if not cached:
            reuse = False  # nothing after a step that runs can come from the cache
        planned.append(PlannedStep(str(index), step, key, cached))
        parent = key
    return BuildPlan(base_key, tuple(planned))
