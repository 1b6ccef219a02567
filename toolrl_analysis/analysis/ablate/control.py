"""Size-matched random controls: as many parameters as a subset, drawn elsewhere, at a like update magnitude.

Reverting the lower-layer MLPs and losing the gain says little on its own: any subset that large, or that
much of the update, might do the same. The control answers "compared with what?". It is drawn like this:

1. **Units are rows.** The pool is the rows of the attention and MLP matrices of the blocks (q, k, v, o,
   gate, up, down; fused q/k/v and gate/up too) that are *not* in the subset. Norms and biases never enter
   it; embedding and head rows enter only when the block matrices outside the subset hold fewer parameters
   than the subset (then every block row is taken and the rest is drawn from those).
2. **Same size, exactly.** Rows are taken in a random order until they hold the subset's parameter count;
   the last row is cut to its first k entries, so the count matches to the parameter.
3. **Like magnitude, where possible.** Each row has an update density d = ||dW_row||^2 / row length. Rows
   are ordered by weighted sampling without replacement (Efraimidis-Spirakis: key = log(-log u) - t*log d,
   smallest first, u uniform from a generator seeded by `seed` and the subset's text), with weight d^t.
   t = 0 is a uniform draw; t is set by bisection on [-16, 16] so that the drawn rows' update energy
   sum ||dW||^2 comes closest to the subset's. When the pool cannot reach it (a subset that holds most of
   the update), the closest draw is kept and `energy_ratio` (control / subset) says how far off it is.

The same control serves the revert and the transplant of its subset. Fixed seed, same pair: the same rows.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from toolrl_analysis.analysis.ablate.splice import Region
from toolrl_analysis.analysis.components import ParameterPart, component_family
from toolrl_analysis.analysis.diff import TensorPair
from toolrl_analysis.analysis.diff.stream import part_rows
from toolrl_analysis.errors import UserError

TILT_RANGE = 16.0
_BISECTIONS = 40


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
    """A size-matched random control for one subset, ready to revert or transplant."""

    subset: str
    regions: dict[str, list[Region]]
    parameters: int  # equals the subset's count
    target_parameters: int
    energy: float  # sum ||dW||^2 of the drawn entries (the cut row pro rata)
    target_energy: float
    tilt: float
    pool_parameters: int
    note: str = ""

    @property
    def energy_ratio(self) -> float:
        return self.energy / self.target_energy if self.target_energy > 0 else float("nan")


def energy_ratio_text(ratio: float | None) -> str:
    """A control's update energy relative to its subset's, for reports: the subset may not have moved at all
    (a run whose updates left it unchanged), and the ratio is then undefined (NaN, or None read from JSON)."""
    if ratio is None or ratio != ratio:
        return "undefined (the subset did not change)"
    return f"{ratio:.2f}x the subset's"


def _in_pool(energy: PartEnergy, blocks: bool) -> bool:
    part = energy.part
    in_blocks = part.layer is not None and component_family(part.component) in ("attn", "mlp")
    return energy.row_energy is not None and in_blocks == blocks


@dataclass
class _Units:
    """The pool's rows as flat arrays: which part, which row, its length and update energy."""

    parts: list[PartEnergy]
    part_index: np.ndarray
    row: np.ndarray
    length: np.ndarray
    energy: np.ndarray

    @classmethod
    def of(cls, parts: Sequence[PartEnergy]) -> _Units:
        index = [np.full(len(p.row_energy), i) for i, p in enumerate(parts)]
        rows = [np.arange(len(p.row_energy)) for p in parts]
        lengths = [np.full(len(p.row_energy), p.row_length) for p in parts]
        energies = [p.row_energy for p in parts]

        def joined(arrays, dtype):
            return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)

        return cls(
            list(parts),
            joined(index, np.int64),
            joined(rows, np.int64),
            joined(lengths, np.int64),
            joined(energies, np.float64),
        )

    @property
    def size(self) -> int:
        return int(self.length.sum())

    def take(self, order: np.ndarray, count: int) -> tuple[np.ndarray, int, float]:
        """The first rows of `order` holding `count` entries: (full rows, entries of the cut row, energy)."""
        cumulative = np.cumsum(self.length[order])
        k = int(np.searchsorted(cumulative, count))  # rows order[:k] hold < count; order[k] reaches it
        full = order[:k]
        taken = int(cumulative[k - 1]) if k else 0
        rest = count - taken
        energy = float(self.energy[full].sum())
        if rest and k < len(order):
            last = order[k]
            if rest == self.length[last]:
                return order[: k + 1], 0, energy + float(self.energy[last])
            energy += float(self.energy[last]) * rest / float(self.length[last])
            return np.append(full, last), rest, energy
        return full, 0, energy


def draw_control(
    subset: str,
    chosen: Sequence[ParameterPart],
    energies: dict[tuple[str, str], PartEnergy],
    seed: int = 0,
) -> Control:
    """Draw the control of the subset `chosen` (its parts; see the module docstring for how)."""
    chosen_keys = {key_of(p) for p in chosen}
    target = sum(energies[k].numel for k in chosen_keys if k in energies)
    target_energy = sum(energies[k].energy for k in chosen_keys if k in energies)
    outside = [e for k, e in energies.items() if k not in chosen_keys]
    blocks = _Units.of([e for e in outside if _in_pool(e, blocks=True)])
    others = _Units.of([e for e in outside if _in_pool(e, blocks=False)])
    if target > blocks.size + others.size:
        raise UserError(
            f"no size-matched control for {subset!r}: it holds {target:,} parameters, the matrices "
            f"outside it only {blocks.size + others.size:,}"
        )
    generator = np.random.default_rng([seed, zlib.crc32(subset.encode())])
    regions: dict[str, list[Region]] = {}
    note, energy, tilt = "", 0.0, 0.0
    if target > blocks.size:  # every block row, the rest from embedding / head rows
        everything = np.arange(len(blocks.row))
        _add_regions(regions, blocks, everything, 0)
        energy = float(blocks.energy.sum())
        rows, cut, drawn, tilt = _tilted_draw(others, target - blocks.size, target_energy - energy, generator)
        _add_regions(regions, others, rows, cut)
        energy += drawn
        note = "the block matrices outside the subset were too few; the rest came from embedding/head rows"
    else:
        rows, cut, energy, tilt = _tilted_draw(blocks, target, target_energy, generator)
        _add_regions(regions, blocks, rows, cut)
        if rows.size == len(blocks.row):
            note = "the control is the whole pool: no room to draw"
    parameters = sum(r.size(energies[key_of(r.part)].shape) for rs in regions.values() for r in rs)
    if parameters != target:  # pragma: no cover - a bug, never a user error
        raise AssertionError(f"control of {subset!r} holds {parameters} parameters, not {target}")
    pool = blocks.size if not others.size or target <= blocks.size else blocks.size + others.size
    control = Control(subset, regions, parameters, target, energy, target_energy, tilt, pool, note)
    if not note and target_energy > 0 and not 0.8 <= control.energy_ratio <= 1.25:
        control.note = (
            f"update magnitude not matched: the pool reaches {control.energy_ratio:.2f}x the subset's"
        )
    return control


def _tilted_draw(
    units: _Units, count: int, target_energy: float, generator: np.random.Generator
) -> tuple[np.ndarray, int, float, float]:
    """(rows, entries of the cut row, energy, tilt) of the draw whose energy comes closest to the target."""
    noise = np.log(-np.log(generator.random(len(units.row)).clip(1e-300, 1.0 - 1e-16)))
    density = units.energy / np.maximum(units.length, 1)
    floor = max(float(density.max(initial=0.0)) * 1e-12, 1e-300)  # a row with no update still gets a weight
    log_density = np.log(density + floor)

    def draw(tilt: float):
        order = np.argsort(noise - tilt * log_density, kind="stable")
        return units.take(order, count)

    low, high = -TILT_RANGE, TILT_RANGE
    best = (math.inf, 0.0, draw(0.0))
    for _ in range(_BISECTIONS):
        tilt = 0.5 * (low + high)
        result = draw(tilt)
        miss = abs(result[2] - target_energy)
        if miss < best[0]:
            best = (miss, tilt, result)
        if result[2] < target_energy:
            low = tilt
        else:
            high = tilt
    for tilt in (0.0, -TILT_RANGE, TILT_RANGE):
        result = draw(tilt)
        if abs(result[2] - target_energy) < best[0]:
            best = (abs(result[2] - target_energy), tilt, result)
    _, tilt, (rows, cut, energy) = best
    return rows, cut, energy, tilt


def _add_regions(regions: dict[str, list[Region]], units: _Units, rows: np.ndarray, cut: int) -> None:
    """Group drawn rows by part; the last drawn row is cut to its first `cut` entries when cut > 0."""
    partial = int(rows[-1]) if cut and len(rows) else None
    full = rows[:-1] if partial is not None else rows
    by_part: dict[int, Region] = {}
    for index in np.unique(units.part_index[full]):
        in_part = full[units.part_index[full] == index]
        by_part[int(index)] = Region(units.parts[int(index)].part, rows=np.sort(units.row[in_part]))
    if partial is not None:
        index = int(units.part_index[partial])
        region = by_part.setdefault(index, Region(units.parts[index].part, rows=np.zeros(0, np.int64)))
        region.partial_row, region.partial_count = int(units.row[partial]), cut
    for region in by_part.values():
        regions.setdefault(region.part.name, []).append(region)


def energy_pairs_in_memory(pairs: dict) -> Iterable[TensorPair]:
    """In-memory pairs (name -> (item, base, trained)) as the TensorPairs `update_energies` reads."""
    for item, base, trained in pairs.values():
        yield TensorPair(item, 0, item.base.rows, base, trained)
