"""Choosing which classes to remove: per-layer or global ratio, round-to-multiple, whole heads.

- ``local`` (per layer): every prunable group keeps ``floor(n * (1 - ratio))`` of its
  ``n`` classes, so at least the requested fraction goes (Torch-Pruning's rule too, so
  both cut alike at the same ratio), and at least one class. With ``round_to`` the kept
  *channel* count is rounded to the nearest multiple of ``round_to`` for channel/neuron
  groups (a class of a grouped Conv is a whole conv group of ``block`` channels; heads
  are counted whole and never rounded), at least one rounding unit. The requested
  ratio therefore holds for every group up to rounding.
- ``global``: scores are divided by their group's mean (so layers of different scale
  compare), and the lowest ``ratio`` of all classes across groups is removed, no
  group losing more than :data:`MAX_GROUP_RATIO` of its classes; kept counts are then
  rounded up to the multiple.

Within a group, exactly-removable classes (zero or constant channels, whose removal
leaves the outputs unchanged) go first, then the lowest scores. With ``zero_only``
only exactly-removable classes are removed. Blocked classes are never removed; a
group never becomes empty, and neither does any tensor carrying part of it (a Split
output, a Slice result, a conv feeding part of a Concat; :attr:`Analysis.nonempty`): its
most important class is kept and, where possible, the group's next weakest class goes
instead, so the count still holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graft.compiler.techniques.pruning.dependency import Analysis, Group
from graft.compiler.techniques.pruning.importance import scores

MAX_GROUP_RATIO = 0.9


class SelectionError(ValueError):
    """A request that cannot be honoured (bad ratio, bad round_to, scope)."""


@dataclass
class Choice:
    """What was chosen for one group.

    Attributes:
        remove: classes to remove.
        requested: the requested ratio (0 for zero-only removal).
        scores: importance per class of the group (aligned with ``group.classes``).
        note: why the result differs from the request (clamped, blocked, fell back), '' if it does not.
    """

    group: Group
    remove: list[int]
    requested: float
    scores: np.ndarray
    note: str = ""

    @property
    def actual(self) -> float:
        return len(self.remove) / self.group.size if self.group.size else 0.0

    @property
    def kept(self) -> int:
        return self.group.size - len(self.remove)


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float in [0, 1).

    Raises:
        SelectionError: outside [0, 1) (1 would remove every channel) or not a number.
    """
    if isinstance(ratio, (str, bytes, bool)) or not isinstance(ratio, (int, float, np.integer, np.floating)):
        raise SelectionError(f"pruning ratio must be a number in [0, 1), got {ratio!r} "
                             f"({type(ratio).__name__})")
    r = float(ratio)
    if not 0.0 <= r < 1.0 or math.isnan(r):
        raise SelectionError(f"pruning ratio must be in [0, 1) (the fraction of channels to remove; 1 would "
                             f"empty every layer), got {ratio!r}")
    return r


def check_round_to(round_to) -> int:
    """``round_to`` as a positive int.

    Raises:
        SelectionError: not a positive integer (a bool, a string, 1.5, NaN, 0).
    """
    ok = isinstance(round_to, (int, np.integer)) or (isinstance(round_to, (float, np.floating)) and
                                                       math.isfinite(round_to) and float(round_to).is_integer())
    if isinstance(round_to, bool) or not ok or round_to < 1:
        raise SelectionError(f"round_to must be a positive integer, got {round_to!r}")
    return int(round_to)


def _unit(group: Group, round_to: int) -> int:
    """Classes per rounding step: kept classes x ``block`` channels must be a multiple of ``round_to``
    (heads are never rounded)."""
    if group.kind == "heads" or round_to <= 1:
        return 1
    return round_to // math.gcd(round_to, group.block)


def _keep_count(group: Group, ratio: float, round_to: int) -> tuple[int, str]:
    n = group.size
    target = n * (1.0 - ratio)
    unit = _unit(group, round_to)
    if unit == 1:
        keep = int(math.floor(target + 1e-9))  # 1e-9: 10 * (1 - 0.3) is 7.000000000000001, others fall below
        note = ""
        if keep < 1:
            keep, note = 1, f"ratio {ratio:g} would empty the group: kept 1"
        return min(keep, n), note
    if n <= unit:
        return n, f"{n * group.block} channels, not more than round_to={round_to}: left whole"
    keep = max(unit, int(math.floor(target / unit + 0.5)) * unit)
    return min(keep, n), ""


def _order(group: Group, sc: np.ndarray) -> list[int]:
    """Prunable classes, exactly-removable ones first, then by ascending score (ties: position)."""
    idx = [i for i, c in enumerate(group.classes) if c not in group.blocked]
    idx.sort(key=lambda i: (not group.exact.get(group.classes[i], False), sc[i], i))
    return [group.classes[i] for i in idx]


def select(analysis: Analysis, ratio: float, *, criterion: str = "l2", scope: str = "local", round_to: int = 1,
           zero_only: bool = False, grads: dict | None = None, groups: list[Group] | None = None) -> list[Choice]:
    """Choose classes to remove in every prunable group.

    Args:
        ratio: fraction of classes to remove, in [0, 1).
        criterion: ``l1``, ``l2``, ``bn_scale`` or ``taylor`` (see :mod:`graft.compiler.techniques.pruning.importance`).
        scope: ``local`` (every group by ``ratio``) or ``global`` (one ranking over all groups).
        round_to: kept channel counts are a multiple of this (1: no rounding).
        zero_only: remove only classes whose removal is exact.
        grads: gradients for ``taylor``.
        groups: restrict to these groups (default: every group with a prunable class).

    Raises:
        SelectionError: ratio outside [0, 1), round_to < 1, unknown scope.
        CriterionError: unknown criterion / taylor without gradients.
    """
    ratio = check_ratio(ratio)
    round_to = check_round_to(round_to)
    if scope not in ("local", "global"):
        raise SelectionError(f"scope must be 'local' (per layer) or 'global', got {scope!r}")
    groups = groups if groups is not None else analysis.prunable_groups
    choices = []
    for g in groups:
        sc, note = scores(analysis, g, criterion, grads)
        choices.append(Choice(g, [], 0.0 if zero_only else ratio, sc, note))
    if zero_only:
        for ch in choices:
            ex = [c for c in _order(ch.group, ch.scores) if ch.group.exact.get(c)]
            if len(ex) >= ch.group.size:
                ex = ex[:-1]
                ch.note = _join(ch.note, "every channel is removable: kept 1")
            ch.remove = ex
        _keep_nonempty(choices, analysis.nonempty, 1, swap=False)
        return choices
    if scope == "local":
        for ch in choices:
            _local(ch, ratio, round_to)
    else:
        _global(choices, ratio, round_to)
    _keep_nonempty(choices, analysis.nonempty, round_to)
    return choices


def _keep_nonempty(choices: list[Choice], nonempty: list, round_to: int, swap: bool = True) -> None:
    """Keep every tensor's channel axis non-empty (:attr:`Analysis.nonempty`: a Split output, a Slice
    result, a conv feeding part of a Concat): give back the most important removed class of a tensor the
    choice would empty, and (``swap``) remove instead the least important other class of the group whose
    removal empties nothing, so the group keeps its count. Without a swap, more classes are given back up
    to the rounding unit."""
    owner = {c: ch for ch in choices for c in ch.remove}
    holders: dict[int, list[int]] = {}
    for i, (classes, _) in enumerate(nonempty):
        for c in classes:
            holders.setdefault(c, []).append(i)
    left = [sum(1 for c in classes if c not in owner) for classes, _ in nonempty]
    unrounded: dict[int, Choice] = {}
    for i, (classes, where) in enumerate(nonempty):
        if not classes or left[i]:
            continue
        # remove lists run from least to most important: give back the latest one
        c = max(classes, key=lambda c: owner[c].remove.index(c))
        ch = owner.pop(c)
        ch.remove.remove(c)
        for j in holders[c]:
            left[j] += 1
        ch.note = _join(ch.note, f"kept {where} from becoming empty")
        other = next((d for d in _order(ch.group, ch.scores) if d != c and d not in owner and
                      all(left[j] > 1 for j in holders.get(d, ()))), None) if swap else None
        if other is None:
            unrounded[id(ch)] = ch
            continue
        ch.remove.append(other)
        owner[other] = ch
        for j in holders.get(other, ()):
            left[j] -= 1
    for ch in unrounded.values():
        unit = _unit(ch.group, round_to)
        while unit > 1 and ch.remove and (ch.group.size - len(ch.remove)) % unit:
            owner.pop(ch.remove.pop(), None)


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a and b else a or b


def _local(ch: Choice, ratio: float, round_to: int) -> None:
    g = ch.group
    keep, note = _keep_count(g, ratio, round_to)
    order = _order(g, ch.scores)
    k = g.size - keep
    if k > len(order):
        k = len(order)
        keep = g.size - k
        unit = _unit(g, round_to)
        if unit > 1 and keep % unit:
            keep = min(g.size, -(-keep // unit) * unit)
            k = g.size - keep
        note = _join(note, f"{len(g.blocked)} of {g.size} blocked: {next(iter(g.blocked.values()))}")
    if _unit(g, round_to) == 1:  # exactly-removable classes beyond the ratio cost nothing: take them too
        extra = [c for c in order[k:] if g.exact.get(c)]
        k += min(len(extra), max(0, g.size - 1 - k))
    ch.remove = order[:k]
    ch.note = _join(ch.note, note)


def _global(choices: list[Choice], ratio: float, round_to: int) -> None:
    pool = []
    for ci, ch in enumerate(choices):
        sc = ch.scores
        mean = float(np.mean(sc)) if sc.size and np.mean(sc) > 0 else 1.0
        pos = {c: i for i, c in enumerate(ch.group.classes)}
        for rank, c in enumerate(_order(ch.group, sc)):
            i = pos[c]
            exact = ch.group.exact.get(c, False)
            pool.append((not exact, sc[i] / mean, ci, rank, c))
    pool.sort()
    total = sum(ch.group.size for ch in choices)
    budget = int(math.floor(total * ratio + 0.5))
    taken = [0] * len(choices)
    for _, _, ci, _, c in pool:
        if budget <= 0:
            break
        g = choices[ci].group
        cap = min(int(g.size * MAX_GROUP_RATIO), g.size - _unit(g, round_to))
        if taken[ci] >= cap:
            continue
        choices[ci].remove.append(c)
        taken[ci] += 1
        budget -= 1
    for ch in choices:
        g = ch.group
        unit = _unit(g, round_to)
        if unit > 1 and ch.remove:
            keep = g.size - len(ch.remove)
            keep = min(g.size, -(-keep // unit) * unit)
            ch.remove = ch.remove[:g.size - keep]
