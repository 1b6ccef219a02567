"""The patching grid over a batch of texts: direction x site x block x position set (and its random draws).

Directions (CMAP, arXiv 2402.14811, across two models of one architecture):
  sufficiency  the base runs with the trained model's activation at the site and positions patched in;
               its change is lp_patched - lp_base, what the patch brings of the training's change
  necessity    the trained model runs with the base's activation patched in; its change is
               lp_trained - lp_patched, what the patch takes away
Both are read as fractions of lp_trained - lp_base (`summary`), per environment the sum of the log-probs of
the trained model's tool-call tokens (`texts`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch

from toolrl_analysis.analysis.patching.backends import Patch
from toolrl_analysis.analysis.patching.texts import CONTROLLED, PatchText

DIRECTIONS = {"sufficiency": ("base", "trained"), "necessity": ("trained", "base")}  # (runs, source)
ENVIRONMENT_COLUMNS = [
    "environment", "env_id", "scenario", "tokens", "targets", "decision", "context", "lp_base", "lp_trained",
    "change",
]  # fmt: skip
PATCH_COLUMNS = [
    "environment",
    "direction",
    "positions",
    "draw",
    "site",
    "layer",
    "count",
    "lp_patched",
    "change",
]
Progress = Callable[[str, int, int], None]


def _batches(texts: Sequence[PatchText], size: int) -> list[list[int]]:
    """Indices of `texts`, shortest first, `size` at a time (little padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].input_ids))
    return [order[i : i + size] for i in range(0, len(order), max(1, size))]


def _mask(lists: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    mask = torch.zeros(len(lists), width, dtype=torch.bool)
    for row, positions in enumerate(lists):
        mask[row, list(positions)] = True
    return mask


def _masks(chunk: Sequence[PatchText], sets: Sequence[str], controls: int, seed: int, width: int):
    """[(set, draw, per-row positions, mask)]: draw 0 is the set itself, 1..controls its random draws."""
    out = []
    for name in sets:
        lists = [text.positions[name] for text in chunk]
        out.append((name, 0, lists, _mask(lists, width)))
        if name in CONTROLLED and controls:
            drawn = [text.controls(name, controls, seed) for text in chunk]
            for draw in range(1, controls + 1):
                lists = [d[draw - 1] for d in drawn]
                out.append((name, draw, lists, _mask(lists, width)))
    return out


def grid_size(n_texts: int, batch_size: int, sets: Sequence[str], sites, layers, controls: int) -> int:
    """Forward passes the grid takes (two clean runs and two captures per batch besides)."""
    per_set = sum(1 + (controls if name in CONTROLLED else 0) for name in sets)
    batches = -(-n_texts // max(1, batch_size))
    return batches * len(DIRECTIONS) * len(sites) * len(layers) * per_set


def measure(
    runners: dict,
    texts: Sequence[PatchText],
    *,
    sites: Sequence[str],
    sets: Sequence[str],
    layers: Sequence[int],
    controls: int,
    seed: int,
    batch_size: int,
    pad_token_id: int = 0,
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(environments, patches): per text its clean log-probs; per text x direction x set x draw x site x
    block the patched log-prob, its change (see the module docstring) and the positions patched."""
    environments, rows = [], []
    total = grid_size(len(texts), batch_size, sets, sites, layers, controls)
    done = 0
    for indices in _batches(texts, batch_size):
        chunk = [texts[i] for i in indices]
        lengths = [len(t.input_ids) for t in chunk]
        ids = torch.full((len(chunk), max(lengths)), pad_token_id, dtype=torch.long)
        for row, text in enumerate(chunk):
            ids[row, : len(text.input_ids)] = torch.as_tensor(text.input_ids)
        targets = [t.targets for t in chunk]
        clean = {name: runner.target_logprobs(ids, targets).tolist() for name, runner in runners.items()}
        captured = {name: runner.capture(ids, lengths) for name, runner in runners.items()}
        for row, text in enumerate(chunk):
            lp_base, lp_trained = clean["base"][row], clean["trained"][row]
            environments.append({
                "environment": text.environment, "env_id": text.env_id, "scenario": text.scenario,
                "tokens": lengths[row], "targets": len(text.targets), "decision": len(text.positions["decision"]),
                "context": len(text.positions["context"]), "lp_base": lp_base, "lp_trained": lp_trained,
                "change": lp_trained - lp_base,
            })  # fmt: skip
        masks = _masks(chunk, sets, controls, seed, ids.shape[1])
        for direction, (runs, source) in DIRECTIONS.items():
            for site in sites:
                for layer in layers:
                    entering = captured[runs][("resid", layer - 1)] if layer else None
                    for name, draw, lists, mask in masks:
                        patch = Patch(site, layer, mask, captured[source][(site, layer)])
                        patched = runners[runs].target_logprobs(ids, targets, patch, entering).tolist()
                        for row, text in enumerate(chunk):
                            change = (
                                patched[row] - clean["base"][row]
                                if direction == "sufficiency"
                                else clean["trained"][row] - patched[row]
                            )
                            rows.append({
                                "environment": text.environment, "direction": direction, "positions": name,
                                "draw": draw, "site": site, "layer": layer, "count": len(lists[row]),
                                "lp_patched": patched[row], "change": change,
                            })  # fmt: skip
                        done += 1
                        if progress is not None:
                            progress(f"{direction} {site}@{layer} {name}", done, total)
        del captured
    frame = pd.DataFrame(environments, columns=ENVIRONMENT_COLUMNS).sort_values("environment")
    return frame.reset_index(drop=True), pd.DataFrame(rows, columns=PATCH_COLUMNS)
