"""Matched random controls: for a subset, other parts of the model like it, drawn many times.

Reverting the lower MLPs and losing part of the change says little on its own: reverting any as large a
piece of the model of the same kind might do the same. A subset's controls answer "compared with what?":

1. **Like for like.** Each part of the subset (a weight matrix, a bias, a norm vector, a slice of a fused
   projection) is matched by a part of the same component family (MLP for MLP, attention for attention) and
   the same shape, so the control has the same parameter count and the same granularity (whole parts).
2. **From other layers.** Partners come only from blocks outside the subset's own blocks, never from the
   subset, and no part twice.
3. **Many draws.** `draws` distinct controls (different sets of parts) are drawn from a generator seeded by
   `seed` and the subset's text; the spread of the controls is the null distribution the subset is placed in.
4. **No substitute.** A part outside the blocks (embedding, head, final norm) has no like part elsewhere, and
   a subset may leave too few like parts outside it (`mlp@middle` of a 4-block model: its complement is the
   only set, so nothing is random). Then there is no valid control: `ControlSet.reason` says why, and the
   verdict is inconclusive. The whole remaining pool is never used in its place.

Fixed seed, same pair: the same controls. The same control serves the revert and the transplant.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from toolrl_analysis.analysis.ablate.splice import Region
from toolrl_analysis.analysis.components import ParameterPart, component_family
from toolrl_analysis.analysis.diff import TensorPair
from toolrl_analysis.analysis.diff.stream import part_rows


@dataclass
class PartEnergy:
    """The update of one parameter part: its size, sum of squares, and per-row sums for matrices."""

    part: ParameterPart
    shape: tuple[int, ...]
    numel: int
    energy: float
    row_energy: np.ndarray | None  # float64 per row of a 2-D part; None otherwise

    @property
    def row_length(self) -> int:
        return (
            self.numel // len(self.row_energy) if self.row_energy is not None and len(self.row_energy) else 0
        )


def key_of(part: ParameterPart) -> tuple[str, str]:
    return (part.name, part.part)


def update_energies(pairs: Iterable[TensorPair]) -> dict[tuple[str, str], PartEnergy]:
    """One pass over the pair (whole tensors or row chunks): the update's size per part and per row."""
    found: dict[tuple[str, str], PartEnergy] = {}
    for pair in pairs:
        item = pair.matched
        if not item.base.dtype.is_floating_point:
            continue
        base = pair.base.double().reshape(pair.base.shape or (1,))
        squared = (pair.trained.double().reshape(base.shape) - base) ** 2
        for part in item.parts:
            rows = part_rows(part, squared, pair.start, pair.stop)
            key = key_of(part)
            entry = found.get(key)
            if entry is None:
                matrix = len(item.base.shape) == 2 and part.dim != 0
                entry = found[key] = PartEnergy(
                    part, item.base.shape, 0, 0.0, np.zeros(item.base.shape[0]) if matrix else None
                )
            if rows is None:
                continue
            entry.numel += rows.numel()
            entry.energy += float(rows.sum())
            if entry.row_energy is not None:
                entry.row_energy[pair.start : pair.stop] += rows.sum(dim=1).numpy()
    return found


@dataclass
class Control:
    """One matched control of a subset: whole parts, ready to revert or transplant."""

    subset: str
    index: int  # which draw
    regions: dict[str, list[Region]]
    parameters: int  # equals the subset's count
    energy: float  # sum ||dW||^2 of its parts
    target_energy: float

    @property
    def energy_ratio(self) -> float:
        return self.energy / self.target_energy if self.target_energy > 0 else float("nan")


@dataclass
class ControlSet:
    """A subset's controls, or none and why (`reason`); `possible` counts the distinct draws found."""

    subset: str
    controls: list[Control]
    requested: int
    reason: str = ""
    note: str = ""

    @property
    def valid(self) -> bool:
        return not self.reason


def energy_ratio_text(ratio: float | None) -> str:
    """A control's update energy relative to its subset's, for reports: the subset may not have moved at all
    (a run whose updates left it unchanged), and the ratio is then undefined (NaN, or None read from JSON)."""
    if ratio is None or ratio != ratio:
        return "undefined (the subset did not change)"
    return f"{ratio:.2f}x the subset's"


def _shape(energy: PartEnergy) -> tuple[int, ...]:
    """The shape of the part itself (a slice of a fused tensor is smaller than its tensor)."""
    part, shape = energy.part, list(energy.shape)
    if part.dim is not None:
        stop = shape[part.dim] if part.stop is None else part.stop
        shape[part.dim] = stop - part.start
    return tuple(shape)


def _like(energy: PartEnergy) -> tuple[str, tuple[int, ...]]:
    return component_family(energy.part.component), _shape(energy)


MIN_DISTINCT = 2  # one set of like parts is the complement, not a random draw
_ATTEMPTS_PER_DRAW = 50


def draw_controls(
    subset: str,
    chosen: Sequence[ParameterPart],
    energies: dict[tuple[str, str], PartEnergy],
    draws: int = 20,
    seed: int = 0,
) -> ControlSet:
    """`draws` distinct matched controls of the subset `chosen` (its parts), or none and why."""
    mine = [energies[key_of(p)] for p in chosen if key_of(p) in energies]
    if not mine:
        return ControlSet(subset, [], draws, reason=f"{subset!r} holds no floating-point parameters")
    outside_blocks = [e.part.label for e in mine if e.part.layer is None]
    if outside_blocks:
        return ControlSet(
            subset, [], draws,
            reason=f"{', '.join(outside_blocks[:3])} lie(s) outside the blocks: no like part exists elsewhere",
        )  # fmt: skip
    layers = {e.part.layer for e in mine}
    keys = {key_of(e.part) for e in mine}
    candidates: dict[tuple, list[PartEnergy]] = {}
    for key, energy in energies.items():
        if energy.part.layer is not None and energy.part.layer not in layers and key not in keys:
            candidates.setdefault(_like(energy), []).append(energy)
    needed: dict[tuple, int] = {}
    for energy in mine:
        needed[_like(energy)] = needed.get(_like(energy), 0) + 1
    for like, count in needed.items():
        have = len(candidates.get(like, []))
        if have < count:
            family, shape = like
            return ControlSet(
                subset, [], draws,
                reason=f"it holds {count} {family} part(s) of shape {list(shape)}; the blocks outside it hold "
                f"{have}: no matched control",
            )  # fmt: skip
    generator = np.random.default_rng([seed, zlib.crc32(subset.encode())])
    target = sum(e.numel for e in mine)
    target_energy = sum(e.energy for e in mine)
    seen: set[frozenset] = set()
    controls: list[Control] = []
    for _ in range(draws * _ATTEMPTS_PER_DRAW):
        if len(controls) == draws:
            break
        picked: list[PartEnergy] = []
        for like, count in needed.items():
            pool = candidates[like]
            picked += [pool[i] for i in generator.choice(len(pool), size=count, replace=False)]
        signature = frozenset(key_of(e.part) for e in picked)
        if signature in seen:
            continue
        seen.add(signature)
        regions: dict[str, list[Region]] = {}
        for energy in picked:
            regions.setdefault(energy.part.name, []).append(Region(energy.part))
        energy = sum(e.energy for e in picked)
        controls.append(
            Control(subset, len(controls), regions, sum(e.numel for e in picked), energy, target_energy)
        )
    if len(controls) < MIN_DISTINCT:
        return ControlSet(
            subset, [], draws,
            reason="only one set of like parts lies outside it (its complement): nothing to draw at random",
        )  # fmt: skip
    if any(c.parameters != target for c in controls):  # pragma: no cover - a bug, never a user error
        raise AssertionError(f"a control of {subset!r} does not hold {target} parameters")
    note = f"only {len(controls)} distinct matched controls exist" if len(controls) < draws else ""
    return ControlSet(subset, controls, draws, note=note)


def energy_pairs_in_memory(pairs: dict) -> Iterable[TensorPair]:
    """In-memory pairs (name -> (item, base, trained)) as the TensorPairs `update_energies` reads."""
    for item, base, trained in pairs.values():
        yield TensorPair(item, 0, item.base.rows, base, trained)
