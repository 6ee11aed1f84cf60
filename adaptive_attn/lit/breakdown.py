"""Where a training step's time goes: each named component's forward range plus the backward of the ops it
ran (autograd's sequence numbers tie a backward node to the forward op that made it), as milliseconds
and as shares of the step. Everything outside the components (embedding, projections, norms, head,
loss) is `rest`."""

import time
from collections import defaultdict
from collections.abc import Callable

import torch

from adaptive_attn.nn.component import PREFIX

BACKWARD = "autograd::engine::evaluate_function:"


def component_of(event) -> str | None:
    """The innermost component range an event ran in, if any."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(PREFIX):
            return parent.name[len(PREFIX) :]
        parent = parent.cpu_parent
    return None


def profile_breakdown(step: Callable[[], object]) -> dict[str, float]:
    """Run `step` once under the profiler -> {component: ms, ..., "rest": ms, "total": ms} (wall time)."""
    with torch.autograd.profiler.profile(use_kineto=False) as prof:  # the CPU profiler, without Kineto's log lines
        start = time.perf_counter()
        step()
        total = 1000 * (time.perf_counter() - start)
    return attribute(prof.function_events, total)


def attribute(events, total_ms: float) -> dict[str, float]:
    ms: dict[str, float] = defaultdict(float)
    owner: dict[int, str] = {}  # sequence number of a forward op -> its component
    for event in events:
        if event.name.startswith(PREFIX):
            if component_of(event) is None:  # not nested in another component
                ms[event.name[len(PREFIX) :]] += event.cpu_time_total / 1000
        elif event.sequence_nr >= 0 and not event.name.startswith(BACKWARD):
            name = component_of(event)
            if name is not None:
                owner[event.sequence_nr] = name
    for event in events:
        if event.name.startswith(BACKWARD) and event.sequence_nr in owner:
            ms[owner[event.sequence_nr]] += event.cpu_time_total / 1000
    ms["rest"] = max(0.0, total_ms - sum(ms.values()))
    ms["total"] = total_ms
    return dict(ms)


def shares(breakdown: dict[str, float]) -> dict[str, float]:
    return {name: ms / breakdown["total"] for name, ms in breakdown.items() if name != "total"}
