"""Batches of (prompt, completions) and the per-token log-probabilities of the completions.

GRPO samples G completions of one prompt, and the prompt is most of every sequence. So a batch holds each
distinct prompt once (left-padded to P) with its `repeats` completions (right-padded to T): the prompt
runs through the model once, its KV cache is copied for each completion, and gradients from all G
completions flow back through the one shared prompt pass. The language-model head runs on the T
completion positions only, so the [B, T, vocab] logits stay small even when prompts are long.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolrl_analysis.errors import CheckpointError
from toolrl_analysis.models.placement import input_device
from toolrl_analysis.rollout import cache_keyword, new_cache, position_ids
from toolrl_analysis.training.objective import entropy_from_logits


@dataclass
class SequenceBatch:
    prompt_ids: torch.Tensor  # [U, P], left-padded
    prompt_attention: torch.Tensor  # [U, P]
    completion_ids: torch.Tensor  # [U * repeats, T], right-padded; rows of one prompt are consecutive
    completion_attention: torch.Tensor  # [U * repeats, T]: 1 on real tokens
    completion_mask: torch.Tensor  # [U * repeats, T]: 1 on tokens the loss covers
    repeats: int = 1

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def to(self, device) -> SequenceBatch:
        """The same batch on `device` (itself when it is there already)."""
        if self.completion_ids.device == torch.device(device):
            return self
        return SequenceBatch(
            self.prompt_ids.to(device), self.prompt_attention.to(device), self.completion_ids.to(device),
            self.completion_attention.to(device), self.completion_mask.to(device), self.repeats,
        )  # fmt: skip

    def completion_rows(self, prompt_index: torch.Tensor) -> torch.Tensor:
        """Rows of `completion_ids` that belong to these prompts."""
        return (prompt_index[:, None] * self.repeats + torch.arange(self.repeats)).flatten()

    def select_prompts(self, prompt_index: torch.Tensor) -> SequenceBatch:
        """The sub-batch of these prompts with all their completions."""
        rows = self.completion_rows(prompt_index)
        return SequenceBatch(
            self.prompt_ids[prompt_index], self.prompt_attention[prompt_index], self.completion_ids[rows],
            self.completion_attention[rows], self.completion_mask[rows], self.repeats,
        )  # fmt: skip


def pack_sequences(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    repeats: int = 1,
    completion_masks: list[list[int]] | None = None,
) -> SequenceBatch:
    """`prompts` are distinct; `completions` holds `repeats` consecutive completions per prompt.
    `completion_masks` can exclude tokens from the loss; by default every completion token counts."""
    if len(completions) != len(prompts) * repeats:
        raise ValueError(f"{len(completions)} completions for {len(prompts)} prompts x {repeats}")
    width = max(len(p) for p in prompts)
    length = max(1, max(len(c) for c in completions))
    prompt_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    prompt_attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        prompt_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        prompt_attention[row, width - len(prompt) :] = 1
    completion_ids = torch.full((len(completions), length), pad_token_id, dtype=torch.long)
    completion_attention = torch.zeros((len(completions), length), dtype=torch.long)
    completion_mask = torch.zeros((len(completions), length), dtype=torch.float32)
    for row, completion in enumerate(completions):
        completion_ids[row, : len(completion)] = torch.tensor(completion, dtype=torch.long)
        completion_attention[row, : len(completion)] = 1
        mask = completion_masks[row] if completion_masks is not None else [1] * len(completion)
        completion_mask[row, : len(completion)] = torch.tensor(mask, dtype=torch.float32)
    return SequenceBatch(
        prompt_ids, prompt_attention, completion_ids, completion_attention, completion_mask, repeats
    )


def completion_logprobs(
    model: torch.nn.Module, batch: SequenceBatch, with_entropy: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities [N, T] of the completion tokens (and optionally the per-token entropy [N, T]) under
    `logits / temperature`: the distribution the completions were sampled from, as verl's actor and
    reference take them (dp_actor: `logits.div_(temperature)`), so the PPO ratio is 1 before the first step.
    Shapes: U prompts of P tokens, N = U * repeats completions of T tokens, hidden size H, vocabulary V."""
    # The model may sit on a GPU; the batch and the returned log-probs stay where the trainer keeps them
    # (the copy back is differentiable, so the loss is taken there and its gradient reaches the model).
    home = batch.completion_ids.device
    batch = batch.to(input_device(model))
    decoder = model.get_decoder()
    cache = new_cache(model)
    cache_kw = cache_keyword(decoder)
    prompt_positions = position_ids(batch.prompt_attention)  # [U, P]
    prompt_hidden = decoder(
        input_ids=batch.prompt_ids, attention_mask=batch.prompt_attention, position_ids=prompt_positions,
        use_cache=True, **{cache_kw: cache},
    ).last_hidden_state  # [U, P, H]  # fmt: skip
    # The last prompt position predicts the first completion token.
    first = prompt_hidden[:, -1:].repeat_interleave(batch.repeats, dim=0)  # [N, 1, H]
    if batch.repeats > 1:
        cache.batch_repeat_interleave(batch.repeats)
    attention = torch.cat(
        [batch.prompt_attention.repeat_interleave(batch.repeats, dim=0), batch.completion_attention], dim=1
    )  # [N, P + T]
    positions = position_ids(attention)[:, batch.prompt_ids.shape[1] :]  # [N, T]
    completion_hidden = decoder(
        input_ids=batch.completion_ids, attention_mask=attention, position_ids=positions, use_cache=True,
        **{cache_kw: cache},
    ).last_hidden_state  # [N, T, H]  # fmt: skip
    hidden = torch.cat([first, completion_hidden[:, :-1]], dim=1)  # [N, T, H]: position t predicts token t
    logits = model.get_output_embeddings()(hidden).float() / temperature  # [N, T, V]
    token_ids = batch.completion_ids.unsqueeze(-1).to(
        logits.device
    )  # [N, T, 1]; the head's device, if spread
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, token_ids).squeeze(-1)  # [N, T]
    entropy = entropy_from_logits(logits).to(home) if with_entropy else None
    return logprobs.to(home), entropy


@torch.no_grad()
def logits_path_error(model: torch.nn.Module, pad_token_id: int) -> float:
    """Largest |difference| between the log-probs `completion_logprobs` computes (the output embedding on
    the decoder's hidden states, prompt once, KV cache copied) and those of `model(...)`, which is what
    sampling uses, on one small fixed batch: two prompts of different lengths, two completions each. A model
    whose forward post-processes its logits (soft-capping, logit scaling) differs; one that does not agrees to
    rounding."""
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = [1 + (7 * i + 3) % (vocab - 1) for i in range(24)]  # fixed, valid token ids
    prompts, completions = [ids[:9], ids[9:14]], [ids[14:19], ids[19:22], ids[2:8], ids[16:18]]
    batch = pack_sequences(prompts, completions, pad_token_id, repeats=2)
    was_training = model.training
    model.eval()
    try:
        fast, _ = completion_logprobs(model, batch)  # [4, T]
        worst = 0.0
        for row, completion in enumerate(completions):
            sequence = torch.tensor(
                [prompts[row // 2] + completion], device=input_device(model)
            )  # [1, P + C]
            logits = model(input_ids=sequence).logits[0, -len(completion) - 1 : -1].float().cpu()  # [C, V]
            direct = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
            worst = max(worst, (direct - fast[row, : len(completion)]).abs().max().item())
    finally:
        model.train(was_training)
    return worst


def check_logits_path(model: torch.nn.Module, pad_token_id: int) -> None:
    """Refuse a model whose training log-probs would not be those it samples from (`logits_path_error`);
    the tolerance allows for half-precision rounding, never for a transformed distribution."""
    dtype = next(model.parameters()).dtype
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    error = logits_path_error(model, pad_token_id)
    if not error <= tolerance:
        raise CheckpointError(
            f"the model's forward changes its logits after the output layer (log-probs differ by {error:.3g} "
            "from the output embedding on the hidden states; soft-capping or logit scaling?): RL would "
            "optimise another distribution than the one it samples, so this model is refused"
        )
