"""Two models' next-token distributions compared token by token, and the sharpened base.

For every labelled token of a set of conversations (`context_meter.LabelledExample`), both models are run on
the same ids, and we keep what the difference between their output distributions is made of: KL(base ||
trained) (the forward KL of RL's Razor), the reverse KL, both entropies, and the change in the log-prob of
the token that was actually written.

The sharpening control: RL makes a policy more confident, and confidence alone lowers the NLL of tokens the
base already ranked first, and raises the NLL of wrong guesses. The *sharpened base* is the base with its
logits multiplied by one factor T, chosen so that its mean entropy on the tokens scored equals the trained
model's. A gain that the sharpened base shows too is a gain of confidence, not of understanding. Scaling
never changes the arg-max, so the sharpened base's top-1 is the base's.

T is fitted after the pass: each token keeps its entropy and NLL at every scale of a fixed geometric grid
(`SCALES`, which holds 1 and 2 exactly), and values at T are interpolated in log T between grid points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from toolrl_analysis.context_meter import LabelledExample, batches, target_logits

# 2**(k/8) for k in -16..24: 0.25 to 8, 41 scales, 9% apart
SCALES = np.array([2.0 ** (k / 8) for k in range(-16, 25)])
TOKEN_COLUMNS = [
    "example", "position", "role", "token", "kl_base_trained", "kl_trained_base", "entropy_base",
    "entropy_trained", "nll_base", "nll_trained", "top1_base", "top1_trained", "argmax_base", "argmax_trained",
]  # fmt: skip


@dataclass
class TokenComparison:
    """Per labelled token (`tokens`, columns `TOKEN_COLUMNS`) and, row for row, the base's entropy and NLL at
    each of `SCALES` (`entropy_at`, `nll_at`: [tokens, len(SCALES)])."""

    tokens: pd.DataFrame
    entropy_at: np.ndarray
    nll_at: np.ndarray

    def fit_scale(self, rows: np.ndarray | None = None) -> float:
        """The T whose sharpened base has the trained model's mean entropy on `rows` (all tokens when None);
        clipped to the grid's ends."""
        chosen = self.tokens if rows is None else self.tokens.iloc[rows]
        if chosen.empty:
            return math.nan
        target = float(chosen["entropy_trained"].mean())
        curve = (self.entropy_at if rows is None else self.entropy_at[rows]).mean(axis=0)
        # entropy falls as the logits are scaled up: interpolate on the reversed (increasing) curve
        return float(np.exp(np.interp(target, curve[::-1], np.log(SCALES)[::-1])))

    def at_scale(self, scale: float) -> pd.DataFrame:
        """`tokens` with the sharpened base's `entropy_sharp` and `nll_sharp` at `scale`."""
        log_scales = np.log(SCALES)
        where = min(max(math.log(scale), log_scales[0]), log_scales[-1])
        i = min(int(np.searchsorted(log_scales, where, side="right")) - 1, len(SCALES) - 2)
        w = (where - log_scales[i]) / (log_scales[i + 1] - log_scales[i])  # one grid for every token

        def between(grid: np.ndarray) -> np.ndarray:
            return grid[:, i] * (1 - w) + grid[:, i + 1] * w

        return self.tokens.assign(entropy_sharp=between(self.entropy_at), nll_sharp=between(self.nll_at))


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(-1)


@torch.no_grad()
def compare_tokens(
    base, trained, examples: Sequence[LabelledExample], batch_tokens: int = 2048
) -> TokenComparison:
    """Both models on the same `examples`, every labelled token compared (see the module docstring)."""
    rows: list[dict] = []
    entropy_at, nll_at = [], []
    scales = torch.tensor(SCALES, dtype=torch.float32)
    for batch in batches(examples, batch_tokens):
        chunk = [examples[i] for i in batch]
        pairs = zip(target_logits(base, chunk), target_logits(trained, chunk), strict=True)
        for index, (of_base, of_trained) in zip(batch, pairs, strict=True):
            if of_base is None or of_trained is None:
                continue
            (z_base, targets), (z_trained, _) = of_base, of_trained
            z_trained = z_trained.to(z_base.device)  # two models may end on different devices
            lp_base, lp_trained = z_base.log_softmax(-1), z_trained.log_softmax(-1)
            p_base, p_trained = lp_base.exp(), lp_trained.exp()
            pick = targets[:, None]
            columns = {
                "kl_base_trained": (p_base * (lp_base - lp_trained)).sum(-1),
                "kl_trained_base": (p_trained * (lp_trained - lp_base)).sum(-1),
                "entropy_base": _entropy(lp_base),
                "entropy_trained": _entropy(lp_trained),
                "nll_base": -lp_base.gather(1, pick)[:, 0],
                "nll_trained": -lp_trained.gather(1, pick)[:, 0],
                "top1_base": (z_base.argmax(-1) == targets).float(),
                "top1_trained": (z_trained.argmax(-1) == targets).float(),
                "argmax_base": z_base.argmax(-1),
                "argmax_trained": z_trained.argmax(-1),
            }
            values = {k: v.tolist() for k, v in columns.items()}
            example = examples[index]
            places = [(p, r) for p, r in example.targets if p > 0]
            for i, (position, role) in enumerate(places):
                rows.append({"example": index, "position": position, "role": role,
                             "token": int(targets[i]), **{k: v[i] for k, v in values.items()}})  # fmt: skip
            # [n, S, V] would be large for a real vocabulary: one scale at a time
            scaled = [(z_base * s).log_softmax(-1) for s in scales]
            entropy_at.append(torch.stack([_entropy(lp) for lp in scaled], 1).cpu().numpy())
            nll_at.append(torch.stack([-lp.gather(1, pick)[:, 0] for lp in scaled], 1).cpu().numpy())
    empty = np.zeros((0, len(SCALES)))
    return TokenComparison(
        pd.DataFrame(rows, columns=TOKEN_COLUMNS),
        np.concatenate(entropy_at).astype(float) if entropy_at else empty,
        np.concatenate(nll_at).astype(float) if nll_at else empty,
    )
