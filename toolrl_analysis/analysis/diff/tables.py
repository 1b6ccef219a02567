"""Aggregation into tidy frames: one row per parameter part, per (layer, component), per depth band, and the
JSON-able summary. Writing them out (CSV, parquet, cleaned JSON) is `results.write_results`."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from toolrl_analysis.analysis.components import (
    COMPONENTS,
    FAMILIES,
    FAMILY_LABELS,
    ParameterPart,
    band_of_layer,
    component_family,
)
from toolrl_analysis.analysis.diff.metrics import (
    HALF_ULP_SPARSITY,
    SPARSITY_COLUMNS,
    SPECTRAL_COLUMNS,
    cosine_from_norms,
    ratio,
)
from toolrl_analysis.analysis.diff.plan import MatchedTensor

BANDS = ("lower", "middle", "upper")


def identity_row(item: MatchedTensor, part: ParameterPart) -> dict[str, Any]:
    shape = list(item.base.shape)
    if part.dim is not None:
        shape[part.dim] = (part.stop if part.stop is not None else shape[part.dim]) - part.start
    return {
        "name": item.name,
        "part": part.part,
        "layer": part.layer,
        "component": part.component,
        "role": part.role,
        "numel": math.prod(shape),
        "dtype": str(item.base.dtype).removeprefix("torch."),
        "trained_dtype": str(item.trained.dtype).removeprefix("torch."),
        "shape": "x".join(map(str, shape)) if shape else "scalar",
    }


def no_spectral() -> dict[str, Any]:
    return {column: (None if column == "spectral_method" else math.nan) for column in SPECTRAL_COLUMNS}


def parameters_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["layer"] = pd.array(frame["layer"].tolist(), dtype="Int64")
    frame["numel"] = frame["numel"].astype("int64")
    return frame


def component_table(parameters: pd.DataFrame) -> pd.DataFrame:
    """Aggregate parameter rows to one row per (layer, component), from the underlying sums:
    norms add in squares, sparsity and mean |dW| weight by numel, the cosine is that of the
    concatenated tensors, bf16_vanishing_share (when present) weighs by ||dW||^2."""
    sparsity = [c for c in (*SPARSITY_COLUMNS, HALF_ULP_SPARSITY) if c in parameters]
    vanishing = "bf16_vanishing_share" in parameters
    frame = parameters.assign(
        base_sq=parameters["base_norm"] ** 2,
        trained_sq=parameters["trained_norm"] ** 2,
        update_sq=parameters["update_norm"] ** 2,
        abs_sum=parameters["mean_abs_update"] * parameters["numel"],
        **{f"{c}_count": parameters[c] * parameters["numel"] for c in sparsity},
    )
    if vanishing:  # NaN (no update) carries no weight
        frame["vanishing_sq"] = frame["bf16_vanishing_share"].fillna(0.0) * frame["update_sq"]
    sums = [
        "numel",
        "base_sq",
        "trained_sq",
        "update_sq",
        "abs_sum",
        *(f"{c}_count" for c in sparsity),
        *(["vanishing_sq"] if vanishing else []),
    ]
    grouped = frame.groupby(["layer", "component"], dropna=False, sort=False)
    table = grouped[sums].sum()
    table["n_parameters"] = grouped.size()
    table["max_abs_update"] = grouped["max_abs_update"].max()
    table = table.reset_index()
    base_norm, trained_norm = table["base_sq"] ** 0.5, table["trained_sq"] ** 0.5
    update_norm = table["update_sq"] ** 0.5
    total_update_sq = table["update_sq"].sum()
    out = pd.DataFrame(
        {
            "layer": pd.array(table["layer"].tolist(), dtype="Int64"),
            "component": table["component"],
            "n_parameters": table["n_parameters"].astype("int64"),
            "numel": table["numel"].astype("int64"),
            "base_norm": base_norm,
            "update_norm": update_norm,
            "relative_frobenius_change": [ratio(u, b) for u, b in zip(update_norm, base_norm, strict=True)],
            "mean_abs_update": table["abs_sum"] / table["numel"].where(table["numel"] > 0),
            "max_abs_update": table["max_abs_update"],
            "cosine_similarity": [
                cosine_from_norms(b, t, u)
                for b, t, u in zip(base_norm, trained_norm, update_norm, strict=True)
            ],
            **{c: table[f"{c}_count"] / table["numel"].where(table["numel"] > 0) for c in sparsity},
            "update_norm_share": table["update_sq"] / total_update_sq if total_update_sq > 0 else 0.0,
        }
    )
    if vanishing:
        out["bf16_vanishing_share"] = table["vanishing_sq"] / table["update_sq"].where(table["update_sq"] > 0)
    return sort_by_component(out)


def sort_by_component(frame: pd.DataFrame) -> pd.DataFrame:
    """Blocks first, by layer, then the parameters outside them; components in COMPONENTS order. Stable, so
    rows of one (layer, component) keep their order."""
    order = {c: i for i, c in enumerate(COMPONENTS)}
    keys = frame.assign(_block=frame["layer"].isna(), _order=frame["component"].map(order).fillna(len(order)))
    keys = keys.sort_values(["_block", "layer", "_order"], kind="stable")
    return keys.drop(columns=["_block", "_order"]).reset_index(drop=True)


def band_summary(parameters: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Share of the update norm (sum of ||dW||_F^2) in the lower / middle / upper third of the blocks,
    per component family (attn, mlp, norm, and all block parameters together).

    share_of_family sums to 1 over the three bands of a family; share_of_total divides by the update of
    the whole checkpoint (embeddings and head included); relative_frobenius_change is the band's
    sqrt(sum ||dW||^2 / sum ||W||^2).
    """
    in_blocks = parameters[parameters["layer"].notna()].copy()
    total_update_sq = float((parameters["update_norm"] ** 2).sum())
    in_blocks["family"] = in_blocks["component"].map(component_family)
    in_blocks["band"] = [band_of_layer(int(layer), n_layers) for layer in in_blocks["layer"]]
    in_blocks["update_sq"] = in_blocks["update_norm"] ** 2
    in_blocks["base_sq"] = in_blocks["base_norm"] ** 2
    band_layers = {
        band: [layer for layer in range(n_layers) if band_of_layer(layer, n_layers) == band] for band in BANDS
    }
    records = []
    for family in (*FAMILIES, "all"):
        rows = in_blocks if family == "all" else in_blocks[in_blocks["family"] == family]
        if rows.empty:
            continue
        family_update_sq = float(rows["update_sq"].sum())
        for band in BANDS:
            selected = rows[rows["band"] == band]
            update_sq, base_sq = float(selected["update_sq"].sum()), float(selected["base_sq"].sum())
            layers = band_layers[band]
            records.append(
                {
                    "family": family,
                    "band": band,
                    "layers": f"{layers[0]}-{layers[-1]}" if layers else "",
                    "n_blocks": len(layers),
                    "update_norm_sq": update_sq,
                    "share_of_family": update_sq / family_update_sq if family_update_sq > 0 else 0.0,
                    "share_of_total": update_sq / total_update_sq if total_update_sq > 0 else 0.0,
                    "relative_frobenius_change": ratio(math.sqrt(update_sq), math.sqrt(base_sq)),
                }
            )
    return pd.DataFrame(
        records,
        columns=[
            "family",
            "band",
            "layers",
            "n_blocks",
            "update_norm_sq",
            "share_of_family",
            "share_of_total",
            "relative_frobenius_change",
        ],
    )


def summarize(base, trained, plan, parameters, components, bands, elapsed, bytes_read, spectral) -> dict:
    base_sq = float((parameters["base_norm"] ** 2).sum())
    update_sq = float((parameters["update_norm"] ** 2).sum())
    top = components.sort_values("relative_frobenius_change", ascending=False, kind="stable").head(10)
    return {
        "base": {"path": str(base.path), "format": base.format, "model_type": base.model_type},
        "trained": {"path": str(trained.path), "format": trained.format, "model_type": trained.model_type},
        "architecture": FAMILY_LABELS.get(plan.mapping.family, plan.mapping.family),
        "n_layers": plan.mapping.n_layers,
        "selector": plan.selector,
        "n_tensors": len(plan.matched),
        "n_rows": len(parameters),
        "n_parameters": int(parameters["numel"].sum()),
        "n_changed_rows": int((parameters["update_norm"] > 0).sum()),
        "update_norm": math.sqrt(update_sq),
        "relative_frobenius_change": ratio(math.sqrt(update_sq), math.sqrt(base_sq)),
        "most_changed": [
            {
                "layer": None if pd.isna(r.layer) else int(r.layer),
                "component": r.component,
                "relative_frobenius_change": float(r.relative_frobenius_change),
                "update_norm_share": float(r.update_norm_share),
            }
            for r in top.itertuples()
        ],
        "bands": bands.to_dict(orient="records"),
        "only_in_base": plan.only_in_base,
        "only_in_trained": plan.only_in_trained,
        "tied": {side: dict(names) for side, names in plan.tied.items() if names},
        "tied_both_sides": dict(plan.tied_both),
        "unmapped": sorted(set(parameters.loc[parameters["component"] == "other", "name"])),
        "spectral": spectral,
        "bytes_read": bytes_read,
        "seconds": elapsed,
    }
