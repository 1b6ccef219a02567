"""The report's tables of the update's geometry relative to the base (`compare --spectral`), of the overlap of
the GRPO seeds' updates (`overlap`), and of cross-model activation patching (`patch`), from the run's files.

Rows are (family, band): the blocks' thirds as everywhere (`components.band_layers`), and `outside` for what
lies outside the blocks (the embedding, a separate head, the final norm).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from toolrl_analysis.analysis.components import band_of_layer, component_family
from toolrl_analysis.analysis.diff.overlap import COUNT_COLUMNS, overlap_ratios
from toolrl_analysis.report.tables import read_csv, read_json

BAND_ORDER = ("lower", "middle", "upper", "outside")


def _with_bands(frame: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    bands = ["outside" if pd.isna(layer) else band_of_layer(int(layer), n_layers) for layer in frame["layer"]]
    return frame.assign(band=bands, family=[component_family(str(c)) for c in frame["component"]])


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    rank = {band: i for i, band in enumerate(BAND_ORDER)}
    return frame.sort_values(["family", "band"], key=lambda s: s.map(rank) if s.name == "band" else s)


def geometry_table(run: Path, policy: str = "grpo") -> pd.DataFrame | None:
    """Per family and band, over the matrices: the median principal-energy share rho_k of the update (its
    share inside the base's top-k singular block) and the median of rho_k over its chance level k^2/(mn), the
    largest principal angle between base and trained top-k subspaces (degrees), the median spectral drift,
    and the share of the squared update that a bf16 copy of the trained model would lose (over every tensor
    of the group)."""
    parameters = read_csv(run / "compare" / policy / "parameters.csv")
    if parameters is None or "principal_energy_share" not in parameters:
        return None
    summary = read_json(run / "compare" / policy / "summary.json") or {}
    n_layers = int(summary.get("n_layers") or parameters["layer"].max() + 1)
    frame = _with_bands(parameters, n_layers)
    frame["update_sq"] = frame["update_norm"] ** 2
    frame["vanishing_sq"] = frame["bf16_vanishing_share"].fillna(0) * frame["update_sq"]
    matrices = frame.dropna(subset=["principal_energy_share"])
    matrices = matrices.assign(
        over_chance=matrices["principal_energy_share"] / matrices["principal_energy_chance"]
    )
    rows = []
    for (family, band), group in matrices.groupby(["family", "band"]):
        everything = frame[(frame["family"] == family) & (frame["band"] == band)]
        rows.append(
            {
                "family": family,
                "band": band,
                "matrices": len(group),
                "k": int(group["k"].max()),
                "energy_share": group["principal_energy_share"].median(),
                "chance": group["principal_energy_chance"].median(),
                "share_over_chance": group["over_chance"].median(),
                "angle_max_deg": group["principal_angle_max"].max(),
                "spectral_drift": group["spectral_drift"].median(),
                "bf16_vanishing_share": everything["vanishing_sq"].sum() / everything["update_sq"].sum()
                if everything["update_sq"].sum() > 0
                else float("nan"),
            }
        )
    return _ordered(pd.DataFrame(rows)) if rows else None


def overlap_table(run: Path) -> pd.DataFrame | None:
    """Per family and band, the masks of the GRPO seeds' updates summed over every pair of seeds: overlap
    |A n B| / |A| and Jaccard beside their chance levels, and the sign agreement on the intersection."""
    pairs = read_csv(run / "overlap" / "overlap.csv")
    summary = read_json(run / "overlap" / "overlap.json") or {}
    if pairs is None or pairs.empty:
        return None
    n_layers = int(summary.get("summary", summary).get("n_layers") or pairs["layer"].max() + 1)
    frame = _with_bands(pairs, n_layers)
    summed = frame.groupby(["family", "band"], as_index=False)[list(COUNT_COLUMNS)].sum()
    ratios = overlap_ratios(summed)
    columns = ["family", "band", "density_a", "overlap_ab", "overlap_ab_chance", "jaccard", "jaccard_chance",
               "sign_agreement"]  # fmt: skip
    table = ratios[columns].rename(
        columns={"density_a": "density", "overlap_ab": "overlap", "overlap_ab_chance": "overlap_chance"}
    )
    return _ordered(table)


def patching_table(run: Path) -> pd.DataFrame | None:
    """Per direction and position set, the block and site that recover most of the training's change in the
    trained model's tool-call log-prob, its interval, the same number of random positions, and Holm's p of
    the difference (patch.json's headline)."""
    document = read_json(run / "patch" / "patch.json")
    if not document or not document.get("headline"):
        return None
    columns = ["direction", "positions", "site", "layer", "recovery", "low", "high", "control_recovery",
               "difference", "p_holm", "reason"]  # fmt: skip
    frame = pd.DataFrame(document["headline"])
    for column in ("recovery", "low", "high", "control_recovery", "difference", "p_holm"):
        if column in frame:  # JSON's null (an unbounded interval) as the table's n/a
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame[[c for c in columns if c in frame]]
