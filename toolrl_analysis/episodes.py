"""How every command plays and measures held-out episodes: one set of defaults, importable without torch
(the CLI builds its --help from them)."""

from __future__ import annotations

from dataclasses import dataclass

from toolrl_analysis.errors import ConfigError

GENERAL_TASKS = 256  # exact-match tasks of the general suite: the report's, enough for its interval
VARIANT_GENERAL_TASKS = 64  # per ablation variant, where the suite runs once per variant


@dataclass(frozen=True)
class EpisodeOptions:
    """How held-out episodes are played, the same for every command that plays them (evaluate, ablate, the
    probe's rollouts, reproduce's evaluation stages), so a flag means one thing everywhere."""

    max_turns: int = 20  # assistant turns before an episode stops (FTRL: 20)
    max_new_tokens: int = (
        128  # tokens per assistant turn; our policy's turns are ~40, this stops a rambling one
    )
    batch_size: int = 32  # prompts generated together
    # Qwen3's `enable_thinking`, passed to the chat template (None: the template's own default; a template
    # without the switch ignores it)
    thinking: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a whole number, at least 1; got {value!r}"
                )

    def template_kwargs(self) -> dict:
        """Extra keywords of `apply_chat_template` for these episodes."""
        return template_kwargs(self.thinking)


def template_kwargs(thinking: bool | None) -> dict:
    """`enable_thinking` when it was chosen; nothing when the template's default should apply."""
    return {} if thinking is None else {"enable_thinking": bool(thinking)}


EPISODES = EpisodeOptions()
