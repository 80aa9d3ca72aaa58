"""Simulated runs for `batchctl plan --simulate`: a fleet, heavy-tailed item times and
preemptions, event by event, to show what the closed-form plan (batchctl.planning) leaves
out. Only the plan command uses it, so it lives apart from the planning policy the
controller runs.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass

from batchctl.planning import (
    DEFAULT_IDLE_EXIT_S,
    DEFAULT_SCALE_DOWN_S,
    DEFAULT_STARTUP_S,
    DEFAULT_VISIBILITY_TIMEOUT_S,
)


@dataclass(frozen=True)
class SimulationInputs:
    """A fleet, a workload and the hazards to simulate. Times in seconds.

    Item durations are lognormal with mean ``sec_per_item`` and shape ``sigma`` (0 makes
    every item take exactly ``sec_per_item``; 1 is a heavy tail where the slowest of 20,000
    items takes tens of times the mean). Each node is preempted at
    ``preemptions_per_node_hour`` (a Poisson process; 0 for dedicated nodes); its in-flight
    item becomes visible on the queue again ``visibility_timeout_s`` later, and the node
    comes back after ``restart_s`` (start-up by default).

    Each node runs its own job: a node that finds the queue empty exits after
    ``idle_exit_s``, staying at most ``visibility_timeout_s`` more while items are in flight
    (``node_leaves_at``), and is billed until then plus ``scale_down_s``. Should an item come
    back when every node has left, the monitor starts them all again (start-up anew).
    """

    items: int
    nodes: int
    sec_per_item: float
    startup_s: float = DEFAULT_STARTUP_S
    sigma: float = 0.5
    preemptions_per_node_hour: float = 0.0
    restart_s: float | None = None
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S
    idle_exit_s: float = DEFAULT_IDLE_EXIT_S
    scale_down_s: float = DEFAULT_SCALE_DOWN_S
    seed: int = 0

    def __post_init__(self) -> None:
        if self.items < 0 or self.nodes < 1:
            raise ValueError("items must be >= 0 and nodes >= 1")
        if not self.sec_per_item > 0 or self.sigma < 0 or self.startup_s < 0:
            raise ValueError("sec_per_item must be positive, sigma and startup_s >= 0")
        if self.preemptions_per_node_hour < 0 or self.visibility_timeout_s < 0:
            raise ValueError("preemption rate and visibility timeout must be >= 0")
        if self.idle_exit_s < 0 or self.scale_down_s < 0:
            raise ValueError("idle_exit_s and scale_down_s must be >= 0")
        if self.restart_s is not None and self.restart_s < 0:
            raise ValueError("restart_s must be >= 0")


@dataclass(frozen=True)
class SimulationResult:
    """What one simulated run took.

    ``ideal_s`` is the lower bound for the same sampled durations: start-up plus the larger
    of the completed work spread perfectly over the nodes and the longest single item.
    ``node_seconds`` is what the nodes are billed: each from its (re)start until its job
    ends, plus the scale-down after it.
    """

    makespan_s: float
    ideal_s: float
    preemptions: int
    redeliveries: int
    node_seconds: float


# Event kinds, ordered so that simultaneous events resolve deterministically.
_READY, _DONE, _RETURN, _PREEMPT, _EXIT = range(5)


class _Simulation:
    """The state of one simulated run; ``run`` drains the queue event by event."""

    def __init__(self, inputs: SimulationInputs) -> None:
        self.inputs = inputs
        # Not for security: a seeded generator makes a simulation repeatable.
        self.rng = random.Random(inputs.seed)  # noqa: S311
        sigma = inputs.sigma
        self.mu = math.log(inputs.sec_per_item) - sigma * sigma / 2.0  # E[duration] == mean
        self.rate_per_s = inputs.preemptions_per_node_hour / 3600.0
        self.restart_s = inputs.startup_s if inputs.restart_s is None else inputs.restart_s
        self.queue: deque[int] = deque(range(inputs.items))
        # (time, kind, sequence, node, node epoch, item); the sequence keeps ties in order.
        self.events: list[tuple[float, int, int, int, int, int]] = []
        self.sequence = 0
        # A node's epoch is bumped when it is preempted, so its stale events are skipped.
        self.epoch = [0] * inputs.nodes
        self.busy: list[tuple[int, float] | None] = [None] * inputs.nodes  # (item, duration)
        self.idle: list[int] = []  # heap of idle nodes: the lowest id takes the next item
        # Billing per node: since when it is held, and whether its job has ended. A node's
        # idle spell is numbered so that an exit scheduled for an earlier spell is skipped.
        self.held_since = [0.0] * inputs.nodes
        self.ready_at = [inputs.startup_s] * inputs.nodes
        self.idle_since = [0.0] * inputs.nodes
        self.idle_spell = [0] * inputs.nodes
        self.left = [False] * inputs.nodes
        self.billed = 0.0
        self.now = 0.0
        self.done = self.preemptions = self.redeliveries = 0
        self.work = self.longest = 0.0

    def push(self, at: float, kind: int, node: int = -1, item: int = -1) -> None:
        epoch = self.epoch[node] if node >= 0 else 0
        heapq.heappush(self.events, (at, kind, self.sequence, node, epoch, item))
        self.sequence += 1

    def dispatch(self, node: int) -> None:
        """Give ``node`` the next item, or park it as idle when the queue is empty."""
        if not self.queue:
            heapq.heappush(self.idle, node)
            self.idle_since[node] = self.now
            self.idle_spell[node] += 1
            # The latest this node's job lasts while items are in flight elsewhere; at the
            # end of the run it leaves sooner (see finish_billing).
            linger = self.inputs.idle_exit_s + self.inputs.visibility_timeout_s
            self.push(self.now + linger, _EXIT, node, self.idle_spell[node])
            return
        item = self.queue.popleft()
        inputs = self.inputs
        duration = (
            self.rng.lognormvariate(self.mu, inputs.sigma)
            if inputs.sigma > 0
            else inputs.sec_per_item
        )
        self.busy[node] = (item, duration)
        self.push(self.now + duration, _DONE, node, item)

    def schedule_preemption(self, node: int) -> None:
        if self.rate_per_s > 0:
            self.push(self.now + self.rng.expovariate(self.rate_per_s), _PREEMPT, node)

    def finish(self, node: int) -> None:
        running = self.busy[node]
        assert running is not None
        self.work += running[1]
        self.longest = max(self.longest, running[1])
        self.busy[node] = None
        self.done += 1
        self.dispatch(node)

    def requeue(self, item: int) -> None:
        self.queue.append(item)
        self.redeliveries += 1
        if all(self.left):
            # Every job ended with work queued: the monitor submits them all again.
            for node in range(self.inputs.nodes):
                self.left[node] = False
                self.held_since[node] = self.now
                self.epoch[node] += 1
                self.ready_at[node] = self.now + self.restart_s
                self.push(self.ready_at[node], _READY, node)
                self.schedule_preemption(node)
            return
        while self.idle and self.queue:
            self.dispatch(heapq.heappop(self.idle))

    def leave(self, node: int, at: float) -> None:
        """The node's job ends at ``at``: bill it, with the scale-down, and drop it."""
        self.billed += at - self.held_since[node] + self.inputs.scale_down_s
        self.left[node] = True
        self.epoch[node] += 1  # its pending preemption no longer applies
        if node in self.idle:
            self.idle.remove(node)
            heapq.heapify(self.idle)

    def exit_idle(self, node: int, spell: int) -> None:
        if not self.left[node] and node in self.idle and spell == self.idle_spell[node]:
            self.leave(node, self.now)

    def finish_billing(self) -> None:
        """The last item is done: the queue is empty, so every node left leaves now."""
        inputs = self.inputs
        for node in range(inputs.nodes):
            if self.left[node]:
                continue
            if node in self.idle:
                since = self.idle_since[node]
            else:  # restarting after a preemption: it comes up to an empty queue
                since = max(self.now, self.ready_at[node])
            self.leave(node, max(self.now, since + inputs.idle_exit_s))

    def preempt(self, node: int) -> None:
        self.preemptions += 1
        running = self.busy[node]
        if running is not None:
            # The message reappears once its visibility timeout runs out.
            self.push(self.now + self.inputs.visibility_timeout_s, _RETURN, -1, running[0])
        self.busy[node] = None
        if node in self.idle:
            self.idle.remove(node)
            heapq.heapify(self.idle)
        self.epoch[node] += 1
        self.ready_at[node] = self.now + self.restart_s
        self.push(self.ready_at[node], _READY, node)
        self.schedule_preemption(node)

    def run(self, max_events: int) -> SimulationResult:
        inputs = self.inputs
        for node in range(inputs.nodes):
            self.push(inputs.startup_s, _READY, node)
            self.schedule_preemption(node)
        handled = 0
        while self.done < inputs.items:
            handled += 1
            if handled > max_events or not self.events:
                raise RuntimeError("simulation did not finish: the preemption rate is too high")
            self.now, kind, _, node, epoch, item = heapq.heappop(self.events)
            if node >= 0 and epoch != self.epoch[node]:
                continue  # the node was preempted after this event was scheduled
            if kind == _READY:
                self.dispatch(node)
            elif kind == _DONE:
                self.finish(node)
            elif kind == _RETURN:
                self.requeue(item)
            elif kind == _EXIT:
                self.exit_idle(node, item)
            else:
                self.preempt(node)
        ideal = inputs.startup_s + max(self.work / inputs.nodes, self.longest)
        makespan = self.now
        self.finish_billing()
        return SimulationResult(
            makespan_s=makespan,
            ideal_s=ideal,
            preemptions=self.preemptions,
            redeliveries=self.redeliveries,
            node_seconds=self.billed,
        )


def simulate(inputs: SimulationInputs, *, max_events: int | None = None) -> SimulationResult:
    """Run one seeded discrete-event simulation of the fleet draining the queue.

    Deterministic for a given ``inputs`` (the seed is part of it). Each node runs its own
    job and is billed until it ends (see SimulationInputs). Raises RuntimeError when
    preemption is so frequent that the run makes no progress within ``max_events`` events.
    """
    if inputs.items == 0:
        return SimulationResult(0.0, 0.0, 0, 0, 0.0)
    limit = max_events if max_events is not None else 50 * inputs.items + 100_000
    return _Simulation(inputs).run(limit)
