"""Batches of (prompt, completion) token sequences and their per-token log-probabilities.

Layout: prompts are left-padded to a common length P and completions right-padded to T, so every
completion starts at column P. The language-model head then runs on the T completion positions only,
which keeps the [B, T, vocab] logits small even when prompts are long.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolrl_analysis.training.advantages import entropy_from_logits


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    position_ids: torch.Tensor  # [B, P + T]
    completion_mask: torch.Tensor  # [B, T]: 1 on tokens the policy produced and is trained on
    prompt_length: int  # P

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack_sequences(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    completion_masks: list[list[int]] | None = None,
) -> SequenceBatch:
    """Left-pad prompts, right-pad completions. `completion_masks` can exclude tokens (e.g. tool output
    inside a whole-episode completion) from the loss; by default every completion token counts."""
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in number")
    prompt_length = max(len(p) for p in prompts)
    completion_length = max(1, max(len(c) for c in completions))
    rows, attention, loss_mask = [], [], []
    for index, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        left = prompt_length - len(prompt)
        right = completion_length - len(completion)
        rows.append([pad_token_id] * left + list(prompt) + list(completion) + [pad_token_id] * right)
        attention.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
        mask = completion_masks[index] if completion_masks is not None else [1] * len(completion)
        loss_mask.append(list(mask) + [0] * right)
    attention_mask = torch.tensor(attention, dtype=torch.long)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return SequenceBatch(
        input_ids=torch.tensor(rows, dtype=torch.long),
        attention_mask=attention_mask,
        position_ids=position_ids,
        completion_mask=torch.tensor(loss_mask, dtype=torch.float32),
        prompt_length=prompt_length,
    )


def completion_logprobs(
    model: torch.nn.Module, batch: SequenceBatch, with_entropy: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities [B, T] of the completion tokens (and optionally the per-token entropy)."""
    decoder = model.get_decoder()
    hidden = decoder(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state
    start = batch.prompt_length - 1  # the hidden state at position i predicts token i + 1
    completion_hidden = hidden[:, start : start + batch.completion_ids.shape[1]]
    logits = model.get_output_embeddings()(completion_hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy
