"""The divergence figure: where the output distributions differ, by token role and by the base's entropy."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def plot_divergence(by_role: pd.DataFrame, by_entropy: pd.DataFrame) -> Figure:
    """Left: mean KL(base || trained) per token role, on each model's trajectories, with intervals over
    environments. Right: the share of all KL carried by each decile of the base's entropy (forking in red)."""
    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    roles = [r for r in dict.fromkeys(by_role["role"]) if r != "all"]
    sources = list(dict.fromkeys(by_role["source"]))
    width = 0.8 / max(len(sources), 1)
    for k, source in enumerate(sources):
        mine = by_role[by_role["source"] == source].set_index("role").reindex(roles)
        x = np.arange(len(roles)) + k * width
        value = mine["kl_base_trained"].to_numpy(float)
        error = np.vstack([value - mine["kl_base_trained_low"], mine["kl_base_trained_high"] - value])
        left.bar(x, value, width, label=f"{source}'s trajectories")
        left.errorbar(x, value, yerr=np.nan_to_num(np.abs(error)), fmt="none", color="black", lw=0.8)
    left.set_xticks(np.arange(len(roles)) + width * (len(sources) - 1) / 2, roles, rotation=35, ha="right")
    left.set_ylabel("KL(base || trained) per token, nats")
    left.legend(fontsize=8)
    colours = ["tab:red" if f else "tab:grey" for f in by_entropy["forking"]]
    right.bar(by_entropy["decile"], by_entropy["kl_share"], color=colours)
    right.set_xlabel("decile of the base's entropy (red: forking tokens)")
    right.set_ylabel("share of all KL")
    figure.tight_layout()
    return figure
