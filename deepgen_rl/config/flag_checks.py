"""Validation helpers and the environment-variable default of the flag dataclasses (``config`` and its flag
modules): each raises ``ValueError`` naming the flag.
"""

from __future__ import annotations

import os
from dataclasses import field


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def _env_field(env_name: str, default: str, help_text: str):
    return field(
        default_factory=lambda: _env(env_name, default),
        metadata={"help": f"{help_text} Default: ${env_name}" + (f", else {default}." if default else ".")},
    )


def _check_choice(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"--{flag} must be one of {', '.join(map(str, allowed))}; got {value!r}.")


def _check_range(flag: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"--{flag} must be in {bracket}{low}, {high}]; got {value}.")


def _check_positive(flag: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"--{flag} must be a positive integer; got {value}.")


def _check_client_flags(prefix: str, args) -> None:
    """The timeout / retry flags of a client group (``--{prefix}_timeout`` ...): (name, bound, bound allowed)."""
    for name, low, closed in (("timeout", 0, False), ("health_timeout", 0, False), ("retry_backoff", 0, True),
                              ("max_retries", 0, True), ("max_concurrency", 1, True)):
        value = getattr(args, f"{prefix}_{name}")
        if value < low or (value == low and not closed):
            raise ValueError(f"--{prefix}_{name} must be {'>=' if closed else '>'} {low}; got {value}.")


def _check_urls(args, *flags: str) -> None:
    for flag in flags:
        url = getattr(args, flag)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--{flag} must be an http(s):// URL; got {url!r}.")

