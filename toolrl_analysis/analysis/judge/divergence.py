"""Where the two models' outputs differ: KL by token role and by the base's entropy, on both models' own
trajectories over held-out environments (`toolrl-analyze divergence`).

RL's Razor (arXiv 2509.04259) measures what RL changed as the forward KL between the base's and the trained
model's next-token distributions on the trained task's text; "Beyond the 80/20 rule" (arXiv 2506.01939)
finds that RL's change concentrates on the few high-entropy "forking" tokens. Here each token of each
trajectory keeps its role (`context_meter.label_roles`), so the change can be read by role: does RL move
the tokens that come from the context (argument values, answers), or the format, or the choice of tool? The
sharpened base (`outputs`) says how much of the entropy change is a uniform rise in confidence.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from toolrl_analysis.analysis.ablate.contrasts import ratio
from toolrl_analysis.analysis.judge.outputs import TokenComparison
from toolrl_analysis.context_meter import ROLES, LabelledExample

FORKING_SHARE = 0.20  # the highest-entropy fifth of the tokens (by the base's entropy) are "forking"
DECILES = 10
TOP_CONTEXTS = 20
CONTEXT_CHARS = 240  # of conversation shown before each max-KL token


@dataclass
class Divergence:
    scale: float  # the sharpening factor fitted on these tokens
    tokens: pd.DataFrame  # per token, with source, environment, the sharpened base's values, entropy decile
    by_role: pd.DataFrame
    by_entropy: pd.DataFrame
    contexts: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    def to_document(self) -> dict[str, Any]:
        from toolrl_analysis.results import json_clean

        return json_clean({"summary": self.summary, "by_role": self.by_role.to_dict("records"),
                           "by_entropy": self.by_entropy.to_dict("records")})  # fmt: skip

    def write(self, out_dir: str | Path) -> list[Path]:
        """tokens / by_role / by_entropy as CSV and parquet, divergence.json, top_contexts.jsonl and
        divergence.png."""
        from toolrl_analysis.analysis.judge.plots import plot_divergence
        from toolrl_analysis.results import write_results

        frames = {"tokens": self.tokens, "by_role": self.by_role, "by_entropy": self.by_entropy}
        written = write_results(out_dir, frames, self.to_document(), "divergence.json", parquet=True)
        out = Path(out_dir)
        lines = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in self.contexts)
        (out / "top_contexts.jsonl").write_text(lines, encoding="utf-8")
        figure = plot_divergence(self.by_role, self.by_entropy)
        figure.savefig(out / "divergence.png", dpi=120, bbox_inches="tight")
        return [*written, out / "top_contexts.jsonl", out / "divergence.png"]


def _per_token_mean(frame: pd.DataFrame, column: str) -> dict[str, float]:
    """Token-weighted mean of `column` with Fieller's interval over environments (sums over tokens)."""
    grouped = frame.groupby(["source", "environment"])
    found = ratio(grouped[column].sum().to_numpy(float), grouped.size().to_numpy(float))
    return {column: found.value, f"{column}_low": found.low, f"{column}_high": found.high}


def _rows(frame: pd.DataFrame, total_kl: float) -> dict[str, Any]:
    row: dict[str, Any] = {"tokens": len(frame)}
    row |= _per_token_mean(frame, "kl_base_trained")
    row |= {
        "kl_trained_base": float(frame["kl_trained_base"].mean()),
        "kl_share": float(frame["kl_base_trained"].sum() / total_kl) if total_kl > 0 else float("nan"),
        "entropy_base": float(frame["entropy_base"].mean()),
        "entropy_sharp": float(frame["entropy_sharp"].mean()),
        "entropy_trained": float(frame["entropy_trained"].mean()),
        "logp_change": float((frame["nll_base"] - frame["nll_trained"]).mean()),
        "logp_change_sharp": float((frame["nll_sharp"] - frame["nll_trained"]).mean()),
        "top1_base": float(frame["top1_base"].mean()),
        "top1_trained": float(frame["top1_trained"].mean()),
    }
    return row


def by_role(tokens: pd.DataFrame) -> pd.DataFrame:
    """Per source x role (and `all`): tokens, mean KL both ways, the role's share of the source's KL,
    entropies of base, sharpened base and trained, and the change in log-prob of the written token."""
    out = []
    for source, mine in tokens.groupby("source", sort=False):
        total = float(mine["kl_base_trained"].sum())
        for role in (*ROLES, "all"):
            chosen = mine if role == "all" else mine[mine["role"] == role]
            if not chosen.empty:
                out.append({"source": source, "role": role, **_rows(chosen, total)})
    return pd.DataFrame(out)


def entropy_deciles(tokens: pd.DataFrame) -> np.ndarray:
    """The decile (1-10) of each token's base entropy among all the tokens (ties share the lower decile)."""
    ranks = tokens["entropy_base"].rank(method="first").to_numpy() - 1
    return (ranks * DECILES // max(len(tokens), 1)).astype(int) + 1


def by_entropy(tokens: pd.DataFrame) -> pd.DataFrame:
    """Per decile of the base's entropy (over both sources' tokens): tokens, KL, its share, entropies, and
    whether the decile is among the forking tokens (the top `FORKING_SHARE`)."""
    total = float(tokens["kl_base_trained"].sum())
    out = []
    for decile, chosen in tokens.groupby("entropy_decile"):
        row = {"decile": int(decile), "forking": int(decile) > DECILES * (1 - FORKING_SHARE)}
        out.append(row | _rows(chosen, total))
    return pd.DataFrame(out)


def top_contexts(
    tokens: pd.DataFrame, examples: Sequence[LabelledExample], tokenizer, n: int = TOP_CONTEXTS
) -> list[dict[str, Any]]:
    """The `n` tokens of largest KL(base || trained), each with the conversation just before it and what each
    model would have written there, for a person to read."""
    out = []
    for row in tokens.nlargest(n, "kl_base_trained").itertuples():
        ids = examples[int(row.example)].ids
        before = tokenizer.decode(ids[: int(row.position)])[-CONTEXT_CHARS:]
        out.append({
            "source": row.source, "environment": int(row.environment), "role": row.role,
            "kl_base_trained": float(row.kl_base_trained), "context": before,
            "token": tokenizer.decode([int(row.token)]), "base_would_write": tokenizer.decode([int(row.argmax_base)]),
            "trained_would_write": tokenizer.decode([int(row.argmax_trained)]),
            "entropy_base": float(row.entropy_base), "entropy_trained": float(row.entropy_trained),
        })  # fmt: skip
    return out


def summarise(
    compared: TokenComparison,
    sources: Sequence[str],
    environments: Sequence[int],
    examples: Sequence[LabelledExample],
    tokenizer,
    top: int = TOP_CONTEXTS,
) -> Divergence:
    """The tables from a comparison of `examples`, where example i is `sources[i]`'s trajectory of
    environment `environments[i]`."""
    scale = compared.fit_scale()
    tokens = compared.at_scale(scale)
    tokens.insert(0, "source", [sources[i] for i in tokens["example"]])
    tokens.insert(1, "environment", [environments[i] for i in tokens["example"]])
    tokens["entropy_decile"] = entropy_deciles(tokens)
    entropy = by_entropy(tokens)
    summary = {
        "scale": scale, "tokens": len(tokens), "environments": len(set(environments)),
        "kl_base_trained": float(tokens["kl_base_trained"].mean()),
        "kl_trained_base": float(tokens["kl_trained_base"].mean()),
        "forking_kl_share": float(entropy.loc[entropy["forking"], "kl_share"].sum(min_count=1)),
        "entropy_base": float(tokens["entropy_base"].mean()), "entropy_trained": float(tokens["entropy_trained"].mean()),
    }  # fmt: skip
    return Divergence(
        scale, tokens, by_role(tokens), entropy, top_contexts(tokens, examples, tokenizer, top), summary
    )


def measure_divergence(
    base: str | Path,
    trained: str | Path,
    envs: str | Path,
    *,
    limit: int | None = None,
    options=None,
    top: int = TOP_CONTEXTS,
    placement=None,
) -> Divergence:
    """Both models play the held-out environments (`ablate.run.heldout_path`) greedily; every token of both
    models' trajectories is compared (`outputs.compare_tokens`) and summarised."""
    from toolrl_analysis.analysis.ablate.likelihood import SOURCES, play
    from toolrl_analysis.analysis.ablate.run import heldout_path, heldout_records
    from toolrl_analysis.analysis.diff import torch_threads
    from toolrl_analysis.analysis.judge.outputs import compare_tokens
    from toolrl_analysis.analysis.judge.run import load_pair
    from toolrl_analysis.envs.sandbox import Sandbox
    from toolrl_analysis.episodes import EPISODES

    options = options or EPISODES
    records = heldout_records(envs, limit)
    models, tokenizer = load_pair(base, trained, placement)
    examples, sources, environments = [], [], []
    with Sandbox(workers=2) as sandbox:
        for source, model in zip(SOURCES, (models[1], models[0]), strict=True):
            # generation of a small model: one thread is fastest (ablate's measurement)
            with torch_threads(1):
                played = play(model, tokenizer, records, sandbox, source, max_turns=options.max_turns,
                              max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                              thinking=options.thinking)  # fmt: skip
            examples += played.examples
            sources += [source] * len(played.examples)
            environments += played.environments
    found = summarise(compare_tokens(*models, examples), sources, environments, examples, tokenizer, top)
    found.summary |= {"base": str(base), "trained": str(trained), "envs": str(heldout_path(envs))}
    return found
