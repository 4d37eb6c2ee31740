"""Checkpoint schedules for the K inner steps: a small action language and its two generators.

A schedule says, for an inner loop of K steps, what the outer backward keeps and what it recomputes.  The
*working state* at step n is what step n starts from: the fast weights, the buffers' values and the RNG
states (global and the model's own generators).  Four actions move it:

* ``Store(n)``: keep the working state (at n) as snapshot n;
* ``Advance(n0, n1)``: steps n0..n1-1 values-only (no graph) from the working state (at n0; then at n1);
* ``Load(n, drop)``: working state := snapshot n (``drop``: the snapshot is released);
* ``Rebuild(n)``: rebuild step n with its full graph (``create_graph`` for second order) from the working
  state at n and propagate the adjoint from n+1 to n; the working state is consumed.

A :class:`Schedule` has two phases.  ``forward`` runs in the autograd Function's forward and ends with the
working state at K-1 (the *pending* state); the executor (:mod:`harness.core.scheduled`) then evaluates step
K-1 values-only for the final weights, keeping the pending state, and ``backward`` starts from it
(``Rebuild(K-1)`` first).  :meth:`Schedule.values_only` counts that output step too.

Generators:

* :func:`binomial` -- Revolve (Griewank and Walther, ACM TOMS 26(1), 2000): the fewest recomputed steps for
  K steps under a bound on stored states.  It converts the actions of ``checkpoint_schedules.Revolve``
  (Firedrake's maintained, pure-Python package of checkpointing schedules; LGPL-3.0, used as a dependency)
  rather than re-deriving the schedule here: the library is maintained, provably optimal and has no
  compiled parts.  Its ``snapshots`` counts the initial state as one snapshot (here: the initial weights,
  alive anyway, with the buffers' values and RNG states at step 0); the state a reverse step reads
  (``write_adj_deps``, here the pending state or the working state before a ``Rebuild``) is not counted.
  Forward(n0, n1, write_ics, write_adj_deps) becomes ``Store(n0)`` (if write_ics), then ``Advance`` over the
  steps whose values are only passed on (all of them, or all but the last with write_adj_deps: that step is
  the next ``Reverse``'s ``Rebuild``); Copy/Move become ``Load`` (keep/drop); EndForward splits the phases.
  Forward step evaluations: the smallest r with K <= C(s + r, s) gives r*K - C(s + r, r - 1) values-only
  steps besides the K rebuilds (Griewank's bound), plus one for the output step.
* :func:`one_step_segments` -- segments of n steps whose backward rebuilds one step at a time: the forward
  stores each segment's input (K/n snapshots); the backward, for each segment from the last, loads its input,
  advances values-only storing each step's input inside the segment, then rebuilds and back-propagates one
  step at a time from the segment's end.  About K/n + n weight copies and one step's graph, instead of K/n
  copies and n steps' graphs (``step_rebuild="segment"``, :func:`harness.core.segment.checkpoint_segment`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence, Union

import checkpoint_schedules as cs

__all__ = ["Action", "Advance", "Load", "Rebuild", "Schedule", "Store", "binomial", "default_snapshots",
           "one_step_segments"]


class Store(NamedTuple):
    n: int


class Advance(NamedTuple):
    n0: int
    n1: int


class Load(NamedTuple):
    n: int
    drop: bool


class Rebuild(NamedTuple):
    n: int


Action = Union[Store, Advance, Load, Rebuild]


@dataclass(frozen=True)
class Schedule:
    """The actions of the forward phase and of the backward phase for ``steps`` inner steps (checked)."""

    steps: int
    forward: tuple[Action, ...]
    backward: tuple[Action, ...]

    def __post_init__(self) -> None:
        self.max_held()  # walks the schedule: raises ValueError if it is not a valid one

    def values_only(self) -> int:
        """Values-only step evaluations: every ``Advance``'s steps and the forward's output step."""
        return 1 + sum(a.n1 - a.n0 for a in self.forward + self.backward if isinstance(a, Advance))

    def rebuilds(self) -> int:
        return sum(isinstance(a, Rebuild) for a in self.backward)

    def max_held(self) -> int:
        """The most snapshots held at once (the working/pending state not counted)."""
        at, held, peak = 0, set(), 0
        rebuilt: list[int] = []
        for phase, actions in (("forward", self.forward), ("backward", self.backward)):
            if phase == "backward":
                _expect(at == self.steps - 1, f"the forward phase must end at step {self.steps - 1}, not {at}")
            for a in actions:
                at = _walk(a, at, held, phase)
                if isinstance(a, Rebuild):
                    rebuilt.append(a.n)
                peak = max(peak, len(held))
        _expect(rebuilt == list(range(self.steps - 1, -1, -1)), f"rebuilds must run K-1..0, got {rebuilt}")
        return peak


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"invalid step schedule: {what}")


def _walk(a: Action, at: int | None, held: set[int], phase: str) -> int | None:
    """The working position after ``a`` (None: consumed); ``held`` updated."""
    if isinstance(a, Load):
        _expect(phase == "backward" and a.n in held, f"{a} loads a snapshot not held")
        if a.drop:
            held.discard(a.n)
        return a.n
    _expect(at is not None and at == (a.n0 if isinstance(a, Advance) else a.n), f"{a} with the working state at {at}")
    if isinstance(a, Store):
        held.add(a.n)
        return at
    if isinstance(a, Advance):
        _expect(a.n0 < a.n1, f"{a} is empty")
        return a.n1
    _expect(phase == "backward", f"{a} in the forward phase")
    return None


def default_snapshots(steps: int) -> int:
    """ceil(log2 K), at least 1: the binomial variants' default number of stored states."""
    return max(1, math.ceil(math.log2(steps))) if steps > 1 else 1


def default_segment(steps: int) -> int:
    """ceil(sqrt K), at least 1: the segment length ``step_ckpt=sqrt`` means (about the one that minimises
    (K/n + n) weight copies)."""
    return math.isqrt(steps - 1) + 1 if steps > 1 else 1


@functools.lru_cache(maxsize=512)
def binomial(steps: int, snapshots: int) -> Schedule:
    """Revolve over ``steps`` inner steps with at most ``snapshots`` stored states (the initial one included)."""
    if steps < 1 or snapshots < 1:
        raise ValueError(f"binomial needs steps >= 1 and snapshots >= 1, got {steps}, {snapshots}")
    phases: tuple[list[Action], list[Action]] = ([], [])
    out, pending = phases[0], None
    for a in cs.Revolve(steps, min(snapshots, steps)):
        if isinstance(a, cs.Forward):
            if a.write_ics:
                out.append(Store(a.n0))
            end = a.n1 - 1 if a.write_adj_deps else a.n1
            if end > a.n0:
                out.append(Advance(a.n0, end))
            pending = end if a.write_adj_deps else None
        elif isinstance(a, cs.Reverse):
            _expect(a.n1 - a.n0 == 1 and pending == a.n0, f"Revolve's {a} after the state at {pending}")
            out.append(Rebuild(a.n0))
            pending = None
        elif isinstance(a, (cs.Copy, cs.Move)):
            out.append(Load(a.n, drop=isinstance(a, cs.Move)))
        elif isinstance(a, cs.EndForward):
            out = phases[1]
        elif isinstance(a, cs.EndReverse):
            break
    return Schedule(steps, tuple(phases[0]), tuple(phases[1]))


def _segment_backward(start: int, end: int) -> list[Action]:
    """Rebuild steps ``start..end-1`` one at a time, from the stored segment input ``start``."""
    out: list[Action] = [Load(start, drop=end - start == 1)]
    for j in range(start + 1, end):
        out.append(Advance(j - 1, j))
        if j < end - 1:
            out.append(Store(j))
    out.append(Rebuild(end - 1))
    for j in range(end - 2, start - 1, -1):
        out += [Load(j, drop=True), Rebuild(j)]
    return out


@functools.lru_cache(maxsize=512)
def one_step_segments(steps: int, length: int) -> Schedule:
    """Segments of ``length`` steps (the last may be shorter), each rebuilt one step at a time."""
    if steps < 1 or length < 1:
        raise ValueError(f"one_step_segments needs steps >= 1 and length >= 1, got {steps}, {length}")
    starts: Sequence[int] = range(0, steps, length)
    forward: list[Action] = []
    for start in starts:
        end = min(start + length, steps - 1)  # the last step is the output step, its input the pending state
        if end > start:
            forward += [Store(start), Advance(start, end)]
    backward: list[Action] = [Rebuild(steps - 1)]
    for start in reversed(starts):
        end = min(start + length, steps - 1)
        if end > start:
            backward += _segment_backward(start, end)
    return Schedule(steps, tuple(forward), tuple(backward))
