"""Linear probes per layer: L2-regularised logistic regression, a control task, and the base-vs-trained
comparison.

For one task and one model, every seed draws a train/test split *by environment* (no environment has rows on
both sides) and a control labelling (the labels permuted within each control type: `control_labels`), and fits
one probe per layer on the real labels and one on the control labels, with features standardised on the
training rows. Selectivity = accuracy - control accuracy. The base and the trained model see the same rows,
splits and control labels for the same seed, so their results pair up; the comparison pairs them over the
held-out environments (the decision points of one environment are not independent), not over seeds.

The probes are multinomial logistic regressions with scikit-learn's objective (C * sum of cross-entropies +
||W||^2 / 2, intercepts unpenalised; a two-class problem penalises the one logit difference as scikit-learn's
binary model does), fitted with torch's L-BFGS. All layers x seeds x {task, control} of one task are one
batched fit: the objective is a sum of independent convex problems, so its minimum is each problem's own, and
one batched fit is an order of magnitude faster than hundreds of separate ones on 2 cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from toolrl_analysis.analysis.stats import holm_reject, mean_ci

METRICS = ("accuracy", "control_accuracy", "selectivity", "majority_accuracy")
EQUIVALENCE_MARGIN = 0.05  # a change in probe accuracy or selectivity smaller than this counts as none
MAX_PARAMETERS_PER_FIT = 3_000_000


@dataclass(frozen=True)
class ProbeSettings:
    seeds: int = 5  # splits (and control labellings) per task; results are mean ± 95% CI over them
    test_fraction: float = 0.3  # share of environments held out
    C: float = 1.0  # inverse L2 strength, as scikit-learn's LogisticRegression
    max_iter: int = 100  # L-BFGS iterations (scikit-learn's default; predictions settle well before)
    min_class_count: int = 5  # rarer labels are dropped before splitting


def frequent_classes(labels: np.ndarray, min_count: int) -> np.ndarray:
    """Mask of the rows whose label occurs at least `min_count` times."""
    values, counts = np.unique(labels, return_counts=True)
    keep = set(values[counts >= min_count].tolist())
    return np.asarray([label in keep for label in labels.tolist()], dtype=bool)


def control_labels(labels: np.ndarray, types: np.ndarray, seed: int) -> np.ndarray:
    """The control task: the labels permuted at random within each control type.

    It keeps P(label | type) and nothing else, so a probe scores on it exactly what the surface type tells
    about the label. A probe of the task can read the type too, so in expectation the control is never easier
    than the task, by construction, and selectivity (accuracy - control accuracy) is what the hidden state
    says about the label beyond its surface type. (Hewitt & Liang's random label per type instead rewards
    memorising types: where the types are salient, the control was easier than the task and selectivity
    went below 0 for that reason alone.)"""
    rng = np.random.default_rng(seed)
    control = labels.copy()
    for kind in np.unique(types):
        rows = np.flatnonzero(types == kind)
        control[rows] = labels[rng.permutation(rows)]
    return control


def group_split(groups: np.ndarray, seed: int, test_fraction: float) -> np.ndarray:
    """Boolean mask of the test rows: a `test_fraction` of the groups (environments), chosen at random."""
    unique = np.unique(groups)
    n_test = min(len(unique) - 1, max(1, round(test_fraction * len(unique))))
    chosen = np.random.default_rng(seed).permutation(unique)[:n_test]
    return np.isin(groups, chosen)


def fit_softmax_probes(
    x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, n_classes: int, C: float, max_iter: int
) -> torch.Tensor:
    """Fit L x K logistic-regression probes at once and return their predictions [L, K, N].

    x [L, N, d]: features per layer; y [K, N]: class indices per problem; train [K, N]: the rows each problem
    learns from. Problem (l, k) standardises x[l] on its training rows and fits on them.
    """
    x = x.to(torch.float64)
    weights_mask = train.to(torch.float64)  # [K, N]
    n_train = weights_mask.sum(dim=1).clamp(min=1)  # [K]
    mean = torch.einsum("kn,lnd->lkd", weights_mask, x) / n_train[None, :, None]
    var = torch.einsum("kn,lnd->lkd", weights_mask, x**2) / n_train[None, :, None] - mean**2
    scale = var.clamp(min=0).sqrt()
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))  # a constant feature stays 0
    n_layers, n_problems, dim = mean.shape
    weight = torch.zeros(n_layers, n_problems, dim, n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_layers, n_problems, n_classes, dtype=torch.float64, requires_grad=True)
    # scikit-learn's binary model has one weight vector; a 2-way softmax splits it in two halves, which
    # halves its squared norm: double the penalty to keep the same objective.
    penalty = (2.0 if n_classes == 2 else 1.0) / (2.0 * C * n_train)  # [K], per mean cross-entropy

    def logits() -> torch.Tensor:  # [L, K, N, classes], on standardised features without materialising them
        folded = weight / scale[..., None]
        offset = bias - torch.einsum("lkd,lkdc->lkc", mean, folded)
        return torch.einsum("lnd,lkdc->lknc", x, folded) + offset[:, :, None, :]

    targets = y[None].expand(n_layers, -1, -1)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-5, tolerance_change=1e-9,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        out = logits()
        losses = torch.nn.functional.cross_entropy(
            out.reshape(-1, n_classes), targets.reshape(-1), reduction="none"
        ).view(targets.shape)  # [L, K, N]
        data = (losses * weights_mask).sum(dim=2) / n_train  # [L, K]
        total = (data + penalty * (weight**2).sum(dim=(2, 3))).sum()
        total.backward()
        return total

    optimizer.step(closure)
    with torch.no_grad():
        return logits().argmax(dim=-1)


def probe_layers(
    features: np.ndarray,
    labels: Sequence,
    groups: Sequence,
    types: Sequence,
    layers: Sequence[int],
    settings: ProbeSettings = ProbeSettings(),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per seed, per environment). One row per (layer, seed): accuracy, control_accuracy, selectivity,
    majority_accuracy, sizes. One row per (layer, environment): the test rows of that environment over the
    seeds that held it out (`rows`), and how many of them the probe (`correct`) and the control probe
    (`control_correct`) got right, for comparisons paired over environments (`compare_probes`).

    `features` is [rows, layers, d]; `labels`, `groups` (environment ids) and `types` (control types) have
    one entry per row.
    """
    layers = list(layers)
    labels, groups, types = (np.asarray(x).astype(str) for x in (labels, groups, types))
    keep = frequent_classes(labels, settings.min_class_count)
    features, labels, groups, types = features[keep], labels[keep], groups[keep], types[keep]
    classes = np.unique(labels)
    index = {label: i for i, label in enumerate(classes.tolist())}
    encode = np.vectorize(index.__getitem__, otypes=[np.int64])
    tests = [group_split(groups, seed, settings.test_fraction) for seed in range(settings.seeds)]
    # Problems k = 2 * seed (real labels) and 2 * seed + 1 (control labels).
    targets = np.stack([encode(y) for seed in range(settings.seeds)
                        for y in (labels, control_labels(labels, types, seed))])  # fmt: skip
    test_mask = np.repeat(np.stack(tests), 2, axis=0)
    # Layers go in chunks that keep L-BFGS's state (parameters x ~45 copies, float64) near 1 GB at most.
    per_layer = targets.shape[0] * features.shape[2] * len(classes)
    chunk = max(1, MAX_PARAMETERS_PER_FIT // per_layer)
    problems = (torch.as_tensor(targets), torch.as_tensor(~test_mask))
    parts = []
    for start in range(0, len(layers), chunk):
        x = torch.as_tensor(
            np.ascontiguousarray(features[:, layers[start : start + chunk]].transpose(1, 0, 2))
        )
        parts.append(fit_softmax_probes(x, *problems, len(classes), settings.C, settings.max_iter).numpy())
    predicted = np.concatenate(parts)  # [L, K, N]
    by_environment = _environment_counts(predicted, targets, tests, groups, layers)
    out = []
    for seed, test in enumerate(tests):
        train_labels = labels[~test]
        values, counts = np.unique(train_labels, return_counts=True)
        majority = float((labels[test] == values[counts.argmax()]).mean())
        for position, layer in enumerate(layers):
            accuracy, control_accuracy = (
                float((predicted[position, 2 * seed + kind][test] == targets[2 * seed + kind][test]).mean())
                for kind in (0, 1)
            )
            out.append(
                {
                    "layer": int(layer),
                    "seed": seed,
                    "accuracy": accuracy,
                    "control_accuracy": control_accuracy,
                    "selectivity": accuracy - control_accuracy,
                    "majority_accuracy": majority,
                    "n_train": int((~test).sum()),
                    "n_test": int(test.sum()),
                    "n_classes": len(classes),
                }
            )
    return pd.DataFrame(out), by_environment


def _environment_counts(predicted, targets, tests, groups, layers) -> pd.DataFrame:
    """Per (layer, environment): held-out rows, and correct answers of the probe and of the control probe,
    summed over the seeds."""
    frames = []
    for seed, test in enumerate(tests):
        hits = predicted[:, 2 * seed : 2 * seed + 2, test] == targets[None, 2 * seed : 2 * seed + 2, test]
        for position, layer in enumerate(layers):
            frames.append(pd.DataFrame({"layer": int(layer), "environment": groups[test], "rows": 1,
                                        "correct": hits[position, 0].astype(int),
                                        "control_correct": hits[position, 1].astype(int)}))  # fmt: skip
    if not frames:
        return pd.DataFrame(columns=["layer", "environment", "rows", "correct", "control_correct"])
    return pd.concat(frames).groupby(["layer", "environment"], as_index=False).sum()


def summarise_probes(
    results: pd.DataFrame, keys: Sequence[str] = ("model", "task", "site", "layer")
) -> pd.DataFrame:
    """Mean and 95% t-interval over seeds of every metric, one row per `keys`."""
    rows = []
    for key, group in results.groupby(list(keys), sort=True):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        for metric in METRICS:
            mean, low, high = mean_ci(group[metric].tolist())
            row |= {f"{metric}_mean": mean, f"{metric}_ci_low": low, f"{metric}_ci_high": high}
        row["seeds"] = int(group["seed"].nunique())
        rows.append(row)
    return pd.DataFrame(rows)


def compare_probes(
    by_environment: pd.DataFrame,
    base: str = "base",
    trained: str = "trained",
    alpha: float = 0.05,
    margin: float = EQUIVALENCE_MARGIN,
) -> pd.DataFrame:
    """Trained minus base per (task, site, layer) for accuracy and selectivity, paired over environments
    (`probe_layers`' counts; both models are probed on the same rows and splits): the change per
    held-out row, its interval (Fieller's, over environments), a two-sided p, Holm's correction over all
    rows, the minimum detectable change (80% power) and an equivalence p (two one-sided tests: is the change
    within +-`margin`?)."""
    from toolrl_analysis.analysis.ablate.contrasts import contrast

    rows = []
    for (task, site, layer), group in by_environment.groupby(["task", "site", "layer"], sort=True):
        wide = group.pivot_table(index="environment", columns="model", values=["rows", "correct", "control_correct"],
                                 aggfunc="sum").dropna()  # fmt: skip
        if base not in wide["rows"] or trained not in wide["rows"] or len(wide) < 2:
            continue
        count = wide["rows"][base].to_numpy(float)
        hits = {m: wide["correct"][m].to_numpy(float) for m in (base, trained)}
        controls = {m: wide["control_correct"][m].to_numpy(float) for m in (base, trained)}
        for metric in ("accuracy", "selectivity"):
            score = {
                m: hits[m] - controls[m] if metric == "selectivity" else hits[m] for m in (base, trained)
            }
            change = score[trained] - score[base]
            found = contrast(change, count, margin=margin, level=1 - alpha)
            below = contrast(-change, count, margin=margin, level=1 - alpha)
            p_two_sided = 2 * min(found.p_more, 1 - found.p_more) if np.isfinite(found.p_more) else np.nan
            if not change.any():
                p_two_sided = 1.0
            rows.append({
                "task": task, "site": site, "layer": layer, "metric": metric,
                "base_mean": score[base].sum() / count.sum(), "trained_mean": score[trained].sum() / count.sum(),
                "diff_mean": found.effect.value, "diff_ci_low": found.effect.low, "diff_ci_high": found.effect.high,
                # with fewer than two environments that differ the spread is not estimable: no MDE
                "p_value": p_two_sided, "n": len(count), "differ": found.differ,
                "mde": found.mde(alpha / 2) if found.differ >= 2 else np.nan,
                "p_equivalent": max(found.p_equivalent, below.p_equivalent),
            })  # fmt: skip
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["significant"] = holm_reject(frame["p_value"].tolist(), alpha)
        # the data exclude a change of `margin` either way, Holm over the same rows
        frame["equivalent"] = holm_reject(frame["p_equivalent"].fillna(1.0).tolist(), alpha)
    return frame
