"""Splice operations: which entries of a hybrid model come from the base, which from the trained model.

Every operation sets a *coefficient* c on the entries it selects; an entry's value is base + c * (trained -
base), with c = 0 read straight from the base and c = 1 straight from the trained model (never through the
arithmetic, so revert and transplant are bitwise exact). The first operation fixes the starting model:
`revert` starts from the trained model (c = 1 everywhere), `transplant` and `scale` from the base (c = 0).
Later operations overwrite earlier ones where they overlap:

    revert SEL       c = 0 on SEL         (the trained model with SEL taken from the base)
    transplant SEL   c = 1 on SEL         (the base with SEL taken from the trained model)
    scale SEL a      c = a on SEL         (base + a * update on SEL)

Other coefficients are blended element by element (`torch.lerp`, in float32, float64 for float64 tensors).
A hybrid tensor has the starting model's dtype. Values are computed per row chunk, and do not depend on the
chunking, so the same code serves the in-memory variants of an evaluation and the streamed `--save`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from toolrl_analysis.analysis.components import ParameterPart
from toolrl_analysis.analysis.diff import MatchedTensor, PairPlan, ScratchBuffers
from toolrl_analysis.analysis.diff.stream import part_rows
from toolrl_analysis.errors import SelectorError, UserError

KINDS = ("revert", "transplant", "scale")
START_COEFFICIENT = {"base": 0.0, "trained": 1.0}


@dataclass(frozen=True)
class Operation:
    """One splice step as the user wrote it: `revert mlp@lower`, `scale attn@0 0.5`."""

    kind: str
    selector: str
    alpha: float | None = None  # scale only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"unknown splice operation {self.kind!r} (use {', '.join(KINDS)})")
        if (self.kind == "scale") != (self.alpha is not None):
            raise UserError(
                "scale needs a selector and a factor (--scale SEL ALPHA); revert and transplant none"
            )
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise UserError(f"--scale {self.selector} {self.alpha}: the factor must be a finite number")

    @property
    def coefficient(self) -> float:
        return {"revert": 0.0, "transplant": 1.0}.get(self.kind, self.alpha)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.selector}" + (f" {self.alpha:g}" if self.kind == "scale" else "")


def starting_model(operations: Sequence[Operation]) -> str:
    """'trained' when the first operation reverts, else 'base' (a transplant or scale puts the update in)."""
    return "trained" if operations and operations[0].kind == "revert" else "base"


@dataclass(eq=False)
class Region:
    """Entries of one parameter part that a step sets: the whole part, or some of its rows, and perhaps the
    first `partial_count` entries of one more row (a size-matched control ends mid-row). Rows are rows of
    the stored tensor; row subsets are only drawn for matrices."""

    part: ParameterPart
    rows: np.ndarray | None = None  # sorted row indices; None = every row of the part
    partial_row: int | None = None
    partial_count: int = 0

    @property
    def whole_tensor(self) -> bool:
        return self.part.dim is None and self.rows is None and self.partial_row is None

    def size(self, shape: Sequence[int]) -> int:
        """How many entries the region holds in a tensor of `shape`."""
        part_shape = list(shape) or [1]
        if self.part.dim is not None:
            stop = part_shape[self.part.dim] if self.part.stop is None else self.part.stop
            part_shape[self.part.dim] = stop - self.part.start
        if self.rows is None and self.partial_row is None:
            return int(np.prod(part_shape))
        row = int(np.prod(part_shape[1:]))
        return len(self.rows if self.rows is not None else ()) * row + self.partial_count

    def assign(self, coefficients: torch.Tensor, start: int, stop: int, value: float) -> None:
        """Set `value` on this region's entries within rows start:stop (`coefficients` holds those rows)."""
        view = part_rows(self.part, coefficients, start, stop)
        if view is None:
            return
        if self.rows is None and self.partial_row is None:
            view.fill_(value)
            return
        if self.rows is not None and len(self.rows):
            low, high = np.searchsorted(self.rows, [start, stop])
            if high > low:
                view[torch.from_numpy(self.rows[low:high] - start)] = value
        if self.partial_row is not None and start <= self.partial_row < stop:
            view[self.partial_row - start].reshape(-1)[: self.partial_count] = value


@dataclass
class Step:
    """One operation resolved against a model: its coefficient and the regions it sets, by tensor name."""

    label: str
    coefficient: float
    regions: dict[str, list[Region]]


@dataclass
class Splice:
    """A hybrid model: the starting model and the steps applied to it in order."""

    label: str
    start: str  # "base" | "trained"
    steps: list[Step] = field(default_factory=list)

    @property
    def start_coefficient(self) -> float:
        return START_COEFFICIENT[self.start]

    def touches(self, name: str) -> bool:
        return any(name in step.regions for step in self.steps)

    def coefficients(self, item: MatchedTensor, start: int, stop: int) -> float | torch.Tensor:
        """The coefficient of every entry in rows start:stop of a tensor: one number when they share it
        (the common case: a whole tensor selected or left alone), else a float32 tensor of the rows' shape."""
        value: float | torch.Tensor = self.start_coefficient
        shape = (stop - start, *item.base.shape[1:]) if item.base.shape else (1,)
        for step in self.steps:
            for region in step.regions.get(item.name, ()):
                if region.whole_tensor:
                    value = step.coefficient
                    continue
                if not isinstance(value, torch.Tensor):
                    value = torch.full(shape, value, dtype=torch.float32)
                region.assign(value, start, stop, step.coefficient)
        return value


def reference(start: str) -> Splice:
    """The base or the trained model itself, as a splice with no steps."""
    return Splice(start, start)


def compile_operations(plan: PairPlan, operations: Sequence[Operation], label: str | None = None) -> Splice:
    """Resolve the operations' selectors against the planned pair (SelectorError names what the model has)."""
    if not operations:
        raise UserError("no splice operation given (--revert, --transplant or --scale)")
    matched = {item.name: item for item in plan.matched}
    splice = Splice(label or ", ".join(op.label for op in operations), starting_model(operations))
    for op in operations:
        parts = [p for p in plan.mapping.select(op.selector) if p.name in matched]
        if not parts:
            raise SelectorError(
                f"selector {op.selector!r} selects only tensors the two checkpoints do not share; "
                f"{plan.mapping.describe()}"
            )
        if op.coefficient not in (0.0, 1.0):
            integral = sorted({p.name for p in parts if not matched[p.name].base.dtype.is_floating_point})
            if integral:
                raise UserError(
                    f"cannot scale integer tensors ({', '.join(integral[:3])}): select floats only"
                )
        regions: dict[str, list[Region]] = {}
        for part in parts:
            regions.setdefault(part.name, []).append(Region(part))
        splice.steps.append(Step(op.label, op.coefficient, regions))
    return splice


def splice_rows(
    coefficients: float | torch.Tensor,
    base: torch.Tensor,
    trained: torch.Tensor,
    dtype: torch.dtype,
    scratch: ScratchBuffers | None = None,
) -> torch.Tensor:
    """Rows of the hybrid tensor in `dtype`: base where c = 0 and trained where c = 1 (copied, bit for bit),
    elsewhere `torch.lerp(base, trained, c)` = base + c * (trained - base) in float32 (float64 for float64),
    element by element, so a row's value does not depend on how the rows were chunked. With `scratch`, a
    blended result lives in its buffers (valid until the next call): a streamed save allocates nothing."""
    if not isinstance(coefficients, torch.Tensor):
        if coefficients == 0.0:
            return base.to(dtype)
        if coefficients == 1.0:
            return trained.to(dtype)
        return _blend(base, trained, float(coefficients), dtype, scratch)
    shape = base.shape
    base, trained = base.reshape(coefficients.shape), trained.reshape(coefficients.shape)
    out = torch.where(coefficients == 1.0, trained.to(dtype), base.to(dtype))
    between = (coefficients != 0.0) & (coefficients != 1.0)
    # One blend per distinct coefficient (one per scale operation): the same arithmetic as a uniform chunk.
    for value in torch.unique(coefficients[between]).tolist():
        chosen = coefficients == value
        out[chosen] = _blend(base[chosen], trained[chosen], value, dtype)
    return out.reshape(shape)


def _blend(
    base: torch.Tensor, trained: torch.Tensor, coefficient: float, dtype: torch.dtype, scratch=None
) -> torch.Tensor:
    wide = torch.promote_types(base.dtype, trained.dtype)
    base, trained = base.to(wide), trained.to(wide)
    if scratch is None:
        return torch.lerp(base, trained, coefficient).to(dtype)
    nbytes = base.numel() * base.element_size()
    out = scratch.get("blend", nbytes)[:nbytes].view(wide).view(base.shape)
    return torch.lerp(base, trained, coefficient, out=out).to(dtype)


@dataclass
class SpliceAccount:
    """What a splice changed relative to its starting model: entries, and their share of the update."""

    parameters: int = 0  # entries whose coefficient differs from the starting model's
    update_energy: float = 0.0  # sum of (trained - base)^2 over those entries
    total_energy: float = 0.0  # sum of (trained - base)^2 over every matched entry

    @property
    def update_share(self) -> float:
        return self.update_energy / self.total_energy if self.total_energy > 0 else float("nan")


def splice_in_memory(
    splice: Splice, pairs: Mapping[str, tuple[MatchedTensor, torch.Tensor, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], SpliceAccount]:
    """Every matched tensor of the hybrid, from whole tensors held in memory (name -> (item, base, trained)),
    and what the splice changed. For models small enough to evaluate."""
    out, account = {}, SpliceAccount()
    for name, (item, base, trained) in pairs.items():
        dtype = (trained if splice.start == "trained" else base).dtype
        rows = item.base.rows
        coefficients = splice.coefficients(item, 0, rows)
        out[name] = splice_rows(coefficients, base, trained, dtype)
        if not base.dtype.is_floating_point:
            continue
        changed = None
        if isinstance(coefficients, torch.Tensor):
            changed = (coefficients != splice.start_coefficient).reshape(-1)
            account.parameters += int(changed.sum())
        elif coefficients != splice.start_coefficient:
            account.parameters += base.numel()
        total, update = _update_energy(base, trained, changed)
        account.total_energy += total
        if changed is not None:
            account.update_energy += update
        elif coefficients != splice.start_coefficient:
            account.update_energy += total
    return out, account


ENERGY_CHUNK = 1 << 22  # entries: float64 squares of a whole embedding would cost 3x its size in temporaries


def _update_energy(
    base: torch.Tensor, trained: torch.Tensor, changed: torch.Tensor | None
) -> tuple[float, float]:
    """(||trained - base||^2, the part of it where `changed`), in float64, a chunk of entries at a time."""
    flat_base, flat_trained = base.reshape(-1), trained.reshape(-1)
    total = update = 0.0
    for start in range(0, flat_base.numel(), ENERGY_CHUNK):
        stop = start + ENERGY_CHUNK
        squared = (flat_trained[start:stop].double() - flat_base[start:stop].double()).square_()
        total += float(squared.sum())
        if changed is not None:
            update += float(squared[changed[start:stop]].sum())
    return total, update
