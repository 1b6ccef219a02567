"""The variants to evaluate: the paper's grid, or the user's own splice, each beside the base and the trained
model it is measured against.

The paper grid holds, for each subset, its revert and its transplant (the *main* variants, which are also
played for Solve-F1) and those of its matched random controls (scored by the teacher-forced metric only);
then the rank-k block: every weight matrix's update truncated to rank k, its residual, and random rank-k
directions of the same norm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from toolrl_analysis.analysis.ablate.control import Control, PartEnergy, draw_controls
from toolrl_analysis.analysis.ablate.low_rank import LowRank, matrices
from toolrl_analysis.analysis.ablate.splice import (
    Operation,
    Splice,
    Step,
    compile_operations,
    reference,
    starting_model,
)
from toolrl_analysis.analysis.ablate.verdict import GridEntry
from toolrl_analysis.analysis.diff import PairPlan
from toolrl_analysis.errors import SelectorError, UserError

GRIDS = ("paper",)
# Each family in each third of the blocks (`components.band_layers`), the paper's own subset (the MLPs of
# blocks 0-2), and the parts outside the blocks: the embedding (with the head when tied), an untied head,
# and every norm. Together they hold the whole update.
PAPER_SUBSETS = (
    "mlp@lower", "mlp@middle", "mlp@upper", "attn@lower", "attn@middle", "attn@upper", "mlp@0-2",
    "embed", "lm_head", "norm",
)  # fmt: skip
DEFAULT_CONTROLS = 20
DEFAULT_RANK = 1


@dataclass
class Variant:
    """One model to evaluate. `splice` and `low_rank` are None when it could not be built (`note` says why).
    A *main* variant is played for Solve-F1 as well; a control is scored by the teacher-forced metric only."""

    name: str
    kind: str  # reference | revert | transplant | splice (the user's own operations)
    subset: str | None = None
    control: bool = False  # a matched random control of `subset`
    splice: Splice | None = None
    note: str = ""
    drawn: Control | None = None
    low_rank: LowRank | None = None
    draw: int | None = None  # which control draw

    @property
    def buildable(self) -> bool:
        return self.splice is not None or self.low_rank is not None

    @property
    def main(self) -> bool:
        return not self.control

    @property
    def start(self) -> str:
        return self.low_rank.start if self.low_rank is not None else self.splice.start


def references() -> list[Variant]:
    return [
        Variant("base", "reference", splice=reference("base")),
        Variant("trained", "reference", splice=reference("trained")),
    ]


def custom_variants(plan: PairPlan, operations: Sequence[Operation]) -> list[Variant]:
    """The base, the trained model, and the user's splice."""
    splice = compile_operations(plan, operations)
    return [*references(), Variant(splice.label, "splice", splice=splice)]


@dataclass
class Grid:
    """The variants, and for each subset the names the verdict reads (`verdict.GridEntry`)."""

    variants: list[Variant]
    entries: list[GridEntry]


def _subset_variants(
    plan: PairPlan, subset: str, energies: dict[tuple[str, str], PartEnergy], draws: int, seed: int
) -> tuple[list[Variant], GridEntry] | None:
    matched = {item.name for item in plan.matched}
    try:
        parts = [p for p in plan.mapping.select(subset) if p.name in matched]
    except SelectorError:
        return None  # e.g. lm_head of a model whose head is tied to the embedding: `embed` covers it
    if not parts:
        return None
    variants, names = [], {}
    for kind in ("revert", "transplant"):
        operation = Operation(kind, subset)
        variants.append(Variant(operation.label, kind, subset, splice=compile_operations(plan, [operation])))
        names[kind] = operation.label
    controls = draw_controls(subset, parts, energies, draws, seed)
    control_names: dict[str, list[str]] = {"revert": [], "transplant": []}
    for kind, coefficient in (("revert", 0.0), ("transplant", 1.0)):
        if not controls.valid:
            variants.append(Variant(f"{kind} control({subset})", kind, subset, True, note=controls.reason))
            continue
        for control in controls.controls:
            name = f"{kind} control({subset})#{control.index}"
            steps = [Step(f"{kind} control", coefficient, control.regions)]
            splice = Splice(name, starting_model([Operation(kind, subset)]), steps)
            variants.append(
                Variant(name, kind, subset, True, splice, controls.note, control, draw=control.index)
            )
            control_names[kind].append(name)
    entry = GridEntry(
        subset, names["revert"], names["transplant"], control_names["revert"], control_names["transplant"],
        reason=controls.reason,
    )  # fmt: skip
    return variants, entry


def rank_label(rank: int) -> str:
    return f"rank-{rank}(matrices)"


def _rank_variants(plan: PairPlan, pairs: Mapping[str, tuple], draws: int, rank: int, seed: int):
    """Every weight matrix's update at rank k, its residual (revert and transplant), and `draws` random
    rank-k transplants of the same norms."""
    names = matrices(plan.mapping.parts, pairs)
    subset = rank_label(rank)
    if not names:
        return [], None
    variants = [
        Variant(f"{kind} {which}-{rank}", kind, subset, low_rank=LowRank(kind, which, rank, names))
        for kind in ("transplant", "revert")
        for which in ("rank", "residual")
    ]
    controls = []
    for index in range(draws):
        name = f"transplant random rank-{rank}#{index}"
        spec = LowRank("transplant", "random", rank, names, seed=seed * 1000 + index)
        variants.append(Variant(name, "transplant", subset, True, low_rank=spec, draw=index))
        controls.append(name)
    entry = GridEntry(subset, None, f"transplant rank-{rank}", [], controls, decided_by="transplant")
    return variants, entry


def paper_grid(
    plan: PairPlan,
    energies: dict[tuple[str, str], PartEnergy],
    pairs: Mapping[str, tuple] | None = None,
    *,
    seed: int = 0,
    draws: int = DEFAULT_CONTROLS,
    rank: int = DEFAULT_RANK,
    subsets: Sequence[str] = PAPER_SUBSETS,
) -> Grid:
    """References, then for each of `subsets` (of `PAPER_SUBSETS`) its revert and transplant and `draws`
    matched controls of each, then the rank-k block (when `pairs` are given and `rank` > 0)."""
    if draws < 2:
        raise UserError("--controls must be at least 2 (the controls' spread is the null distribution)")
    unknown = [s for s in subsets if s not in PAPER_SUBSETS]
    if unknown:
        raise UserError(f"unknown subset {unknown[0]!r} (the grid's: {', '.join(PAPER_SUBSETS)})")
    variants, entries = references(), []
    n_layers = plan.mapping.n_layers
    for subset in subsets:
        if subset == "mlp@0-2" and n_layers < 3:
            note = f"the model has {n_layers} blocks; the paper's subset needs 3"
            variants += [Variant(f"{k} {subset}", k, subset, note=note) for k in ("revert", "transplant")]
            entries.append(GridEntry(subset, None, None, [], [], reason=note))
            continue
        found = _subset_variants(plan, subset, energies, draws, seed)
        if found is not None:
            variants += found[0]
            entries.append(found[1])
    if pairs is not None and rank > 0:
        extra, entry = _rank_variants(plan, pairs, draws, rank, seed)
        variants += extra
        if entry is not None:
            entries.append(entry)
    return Grid(variants, entries)


def grid_variants(name: str, *args, **kwargs) -> Grid:
    """The grid called `name` (its arguments are `paper_grid`'s)."""
    if name != "paper":
        raise UserError(f"unknown grid {name!r} (known: {', '.join(GRIDS)})")
    return paper_grid(*args, **kwargs)
