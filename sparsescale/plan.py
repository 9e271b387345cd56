"""The loop's compile plan: which steps of a (stacked) job run under which compiled step.

A job's steps split into segments where the compiled step changes: the fork from the shared
dense prefix (`stack_rules.shared_prefix`: until then the stack trains one variant per distinct seed
and data) and the block-sparse phases (`block_phase.block_phase_steps`). The loop builds one step
per segment and runs it from `start` to `stop`. A pure function of the job's shape, so it is
tested without training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Segment:
    """Steps [start, stop) under one compiled step.

    trained: the members whose variants the segment's stack holds (its variant axis, in order).
    slots:   member k's state is variant `slots[k]` of that stack (shared prefix: several members
             read one variant).
    block_phase: how many block-sparse switches are in force (0: masked layers).
    """

    start: int
    stop: int
    trained: tuple[int, ...]
    slots: tuple[int, ...]
    block_phase: int = 0

    @property
    def shared(self) -> bool:
        """Whether members share variants (the shared dense prefix)."""
        return len(self.trained) < len(self.slots)


def compile_plan(
    start: int,
    total: int,
    members: int,
    prefix: tuple[int, Sequence[int], Sequence[int]] = (0, (), ()),
    block_steps: Sequence[int] = (),
) -> list[Segment]:
    """The segments of a job of `members` runs resumed at `start` of `total` steps. `prefix` is
    `stack_rules.shared_prefix`'s (steps, representative members, member → representative slot);
    the prefix ends at the first block-sparse switch at the latest (the block step trains every
    variant). Empty when nothing is left to train."""
    fork_at, reps, shared_slot = prefix
    if not reps:
        fork_at = 0
    fork_at = min([fork_at, *block_steps])
    everyone = tuple(range(members))
    cuts = {start, total, *(t for t in (fork_at, *block_steps) if start < t < total)}
    bounds = sorted(cuts)
    segments = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        shared = a < fork_at
        segments.append(
            Segment(
                start=a,
                stop=b,
                trained=tuple(reps) if shared else everyone,
                slots=tuple(shared_slot) if shared else everyone,
                block_phase=sum(t <= a for t in block_steps),
            )
        )
    return segments
