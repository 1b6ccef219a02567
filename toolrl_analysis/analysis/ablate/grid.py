"""The variants to evaluate: the paper's grid, or the user's own splice, each beside the base and the trained
model it is measured against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from toolrl_analysis.analysis.ablate.control import Control, PartEnergy, draw_control
from toolrl_analysis.analysis.ablate.splice import (
    Operation,
    Splice,
    Step,
    compile_operations,
    reference,
    starting_model,
)
from toolrl_analysis.analysis.diff import PairPlan
from toolrl_analysis.errors import UserError

GRIDS = ("paper",)
# {MLP, attention} x {lower, upper half}, and the paper's own subset: the MLPs of layers 0-2.
PAPER_SUBSETS = ("mlp@lower", "mlp@upper", "attn@lower", "attn@upper", "mlp@0-2")


@dataclass
class Variant:
    """One model to evaluate. `splice` is None when it could not be built (`note` says why)."""

    name: str
    kind: str  # reference | revert | transplant | splice (the user's own operations)
    subset: str | None = None
    control: bool = False  # the size-matched random control of `subset`
    splice: Splice | None = None
    note: str = ""
    drawn: Control | None = None


def references() -> list[Variant]:
    return [
        Variant("base", "reference", splice=reference("base")),
        Variant("trained", "reference", splice=reference("trained")),
    ]


def custom_variants(plan: PairPlan, operations: Sequence[Operation]) -> list[Variant]:
    """The base, the trained model, and the user's splice."""
    splice = compile_operations(plan, operations)
    return [*references(), Variant(splice.label, "splice", splice=splice)]


def paper_grid(plan: PairPlan, energies: dict[tuple[str, str], PartEnergy], seed: int = 0) -> list[Variant]:
    """References, then for each subset: revert it, revert its control, transplant it, transplant its control."""
    variants = references()
    n_layers = plan.mapping.n_layers
    for subset in PAPER_SUBSETS:
        if subset == "mlp@0-2" and n_layers < 3:
            note = f"the model has {n_layers} blocks; the paper's subset needs 3"
            variants += [Variant(f"{k} {subset}", k, subset, note=note) for k in ("revert", "transplant")]
            continue
        matched = {item.name for item in plan.matched}
        parts = [p for p in plan.mapping.select(subset) if p.name in matched]
        try:
            control, control_note = draw_control(subset, parts, energies, seed), ""
        except UserError as exc:
            control, control_note = None, str(exc)
        for kind in ("revert", "transplant"):
            operation = Operation(kind, subset)
            variants.append(
                Variant(operation.label, kind, subset, splice=compile_operations(plan, [operation]))
            )
            name = f"{kind} control({subset})"
            if control is None:
                variants.append(Variant(name, kind, subset, control=True, note=control_note))
                continue
            steps = [Step(f"{kind} control", operation.coefficient, control.regions)]
            splice = Splice(name, starting_model([operation]), steps)
            variants.append(Variant(name, kind, subset, True, splice, control.note, control))
    return variants


def grid_variants(
    name: str, plan: PairPlan, energies: dict[tuple[str, str], PartEnergy], seed: int
) -> list[Variant]:
    if name != "paper":
        raise UserError(f"unknown grid {name!r} (known: {', '.join(GRIDS)})")
    return paper_grid(plan, energies, seed)
