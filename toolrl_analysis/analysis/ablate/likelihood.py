"""The teacher-forced metric: how likely each variant finds the trained model's own greedy trajectories.

Solve-F1 of greedy episodes is the behaviour that matters, but a few points of gain on tens of environments
cannot say which of dozens of variants keeps it. Scoring fixed trajectories is cheap and has little noise:
the trained model and the base each play the environments once (greedy), every trajectory is labelled by
token role (`context_meter.label_roles`), and each variant then scores every assistant token of them in one
forward pass per conversation. Per environment, the log-likelihood of the trained model's trajectory moves
from LL_base to LL_trained; a variant keeps the fraction (LL_variant - LL_base) / (LL_trained - LL_base) of
that change (a ratio of means over environments, with Fieller's interval: `contrasts.ratio`).

Cost: variants x environments x tokens. A conversation of the embedded model runs to ~600 tokens (~100 of them
assistant tokens); scoring one takes ~20 ms on 2 cores, so 200 variants x 192 environments is ~13 minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from toolrl_analysis.context_meter import LabelledExample, label_roles, role_sums, token_nlls
from toolrl_analysis.envs.schema import EnvRecord

SOURCES = ("trained", "base")  # whose greedy trajectories are scored
LIKELIHOOD_COLUMNS = ["source", "environment", "role", "nll_sum", "top1_sum", "tokens"]
# Tokens per forward batch: short batches keep the activations in cache (measured: 2,048 scored 64
# conversations 1.5x faster than 8,192 on 2 cores).
BATCH_TOKENS = 2048


@dataclass
class Trajectories:
    """One model's greedy trajectories, labelled: `environments[i]` is the record index of `examples[i]`."""

    source: str
    examples: list[LabelledExample]
    environments: list[int]


def play(
    model, tokenizer, records: Sequence[EnvRecord], sandbox, source: str, *, max_turns: int,
    max_new_tokens: int, batch_size: int, thinking: bool | None = None,
) -> Trajectories:  # fmt: skip
    """Greedy episodes of `model` on `records`, labelled by role (an episode without an assistant token is
    dropped: there is nothing to score)."""
    from toolrl_analysis.evaluate import evaluate_tool_use

    episodes = evaluate_tool_use(
        model, tokenizer, records, sandbox=sandbox, max_turns=max_turns, max_new_tokens=max_new_tokens,
        batch_size=batch_size, thinking=thinking,
    )  # fmt: skip
    examples, environments = [], []
    for index, episode in enumerate(episodes):
        labelled = label_roles(tokenizer, episode.messages, episode.record.tools, episode.record.answer)
        if any(position > 0 for position, _ in labelled.targets):
            examples.append(labelled)
            environments.append(index)
    return Trajectories(source, examples, environments)


def score(model, trajectories: Sequence[Trajectories]) -> pd.DataFrame:
    """Per source x environment x role: the NLL sum, top-1 hits and tokens of every assistant token."""
    rows = []
    for trajectory in trajectories:
        scored = token_nlls(model, trajectory.examples, BATCH_TOKENS)
        for example, environment, values in zip(
            trajectory.examples, trajectory.environments, scored, strict=True
        ):
            place = {"source": trajectory.source, "environment": environment}
            rows += [{**place, **sums} for sums in role_sums(example, values)]
    return pd.DataFrame(rows, columns=LIKELIHOOD_COLUMNS)


def changes(frame: pd.DataFrame, source: str = "trained", roles: Sequence[str] | None = None) -> dict:
    """variant -> LL_variant - LL_base per environment (a numpy array over the environments every variant
    scored, in one order), from the concatenated scores (`score` with a `variant` column)."""
    chosen = frame[frame["source"] == source]
    if roles is not None:
        chosen = chosen[chosen["role"].isin(list(roles))]
    table = (-chosen.groupby(["variant", "environment"])["nll_sum"].sum()).unstack("environment")
    table = table.dropna(axis=1)
    if "base" not in table.index:
        return {}
    base = table.loc["base"].to_numpy(float)
    return {name: row.to_numpy(float) - base for name, row in table.iterrows()}


def role_fractions(frame: pd.DataFrame, variants: Sequence[str]) -> pd.DataFrame:
    """Per variant x source x role: the fraction of the change each of `variants` keeps on that role's tokens
    (Fieller interval over environments), on the trained model's and on the base's trajectories. On the
    base's, the change is how much less likely the trained model finds them; the fraction is read alike."""
    from toolrl_analysis.analysis.ablate.contrasts import ratio
    from toolrl_analysis.context_meter import ROLES

    rows = []
    for source in SOURCES:
        of_source = frame[frame["source"] == source]
        for role in ROLES:
            tokens = int(
                of_source.loc[(of_source["role"] == role) & (of_source["variant"] == "base"), "tokens"].sum()
            )
            values = changes(frame, source, [role]) if tokens else {}
            if "trained" not in values:
                continue
            for name in variants:
                if name in values:
                    found = ratio(values[name], values["trained"])
                    rows.append({"variant": name, "source": source, "role": role, "tokens": tokens,
                                 "kept": found.value, "low": found.low, "high": found.high})  # fmt: skip
    return pd.DataFrame(rows, columns=["variant", "source", "role", "tokens", "kept", "low", "high"])
