"""Errors a user can cause. The CLI prints their message on one line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user: a path, a file, a selector, a config value. Message is one line."""


class EnvFormatError(UserError):
    """An environment record or file that does not follow the FTRL format."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, unsafe, or does not match its partner."""


class SelectorError(UserError):
    """A parameter selector such as `mlp@0-2` that cannot be parsed or selects nothing."""


class ConfigError(UserError):
    """A configuration key that is unknown or out of range; the message names the key."""


class TrainingDiverged(UserError):
    """The loss became NaN or Inf; training stops and the last good checkpoint is kept."""


def first_line(exc: BaseException) -> str:
    """An exception's message on one line (its class name when it has none), for one-line user errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def first_names(names: list[str], limit: int = 6) -> str:
    """The first `limit` names, comma-separated, and how many more there are: lists in one-line errors."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
