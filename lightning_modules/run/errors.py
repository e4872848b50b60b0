"""Errors a user can fix, reported as one line without a traceback.

Library errors that a bad config value provokes (torch's optimizer checks, a checkpoint that is not
ours) are translated here into a line that names the key, the value and what is allowed.
"""
from __future__ import annotations

import re


class UserError(Exception):
    """A problem with the user's config, data or checkpoint, reported as one line without a traceback."""


def one_line(error: BaseException | str) -> str:
    """The message of ``error`` folded onto one line (the first line for multi-line library messages)."""
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


# torch.optim's argument checks, keyed by the text torch raises: (config key, what is allowed).
_OPTIMIZER_CHECKS = (
    (r"Invalid learning rate: (\S+)", "optimizer.lr", "a number >= 0, e.g. optimizer.lr=1e-3"),
    (r"Invalid weight_decay value: (\S+)", "optimizer.weight_decay", "a number >= 0"),
    (r"Invalid epsilon value: (\S+)", "optimizer.eps", "a number >= 0"),
    (r"Invalid momentum value: (\S+)", "optimizer.momentum", "a number >= 0"),
    (r"Invalid beta parameter at index (\d): (\S+)", "optimizer.betas", "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    (r"Nesterov momentum requires a momentum and zero dampening", "optimizer.nesterov",
     "nesterov=true only with momentum > 0 and dampening = 0"),
)


def optimizer_error(error: Exception) -> UserError:
    """A one-line UserError for an optimizer/scheduler construction error, naming the config key."""
    message = one_line(error)
    for pattern, key, allowed in _OPTIMIZER_CHECKS:
        match = re.search(pattern, message)
        if match:
            value = match.groups()[-1] if match.groups() else ""
            shown = f"={value}" if value else ""
            return UserError(f"{key}{shown} is not allowed: it must be {allowed}")
    return UserError(f"optimizer/scheduler: {message}")
