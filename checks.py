"""Checking a config's fields: the one way every config dataclass refuses a value it cannot take
(ModelConfig, RewardConfig, PPOConfig, SFTConfig), and the error the command line turns into a
one-line message naming the flag."""

from __future__ import annotations

import math
from dataclasses import fields


class ConfigError(ValueError):
    """A config field holds a value it cannot take. `field` names it (a flag of the same name, with
    dashes, sets it), `what` says what it must be; `related` names the other field the rule reads
    (n_heads for d_model), so a command line can blame the one of the two the user set."""

    def __init__(self, field: str, value, what: str, related: str | None = None):
        self.field, self.value, self.what, self.related = field, value, what, related
        super().__init__(f"{field} must be {what}, got {value!r}")


def finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Rules for `check_fields`: (predicate, what the value must be).
AT_LEAST_1 = (lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1")
AT_LEAST_0 = (lambda v: isinstance(v, int) and v >= 0, "a whole number >= 0")
POSITIVE = (lambda v: finite_number(v) and v > 0, "a positive, finite number")
NON_NEGATIVE = (lambda v: finite_number(v) and v >= 0, "a finite number >= 0")
FINITE = (finite_number, "a finite number")
BOOL = (lambda v: isinstance(v, bool), "True or False")
SHARE = (lambda v: finite_number(v) and 0 <= v < 1, "a share in [0, 1), e.g. 0.3")


def one_of(*choices):
    """A `check_fields` rule: the value is one of `choices`."""
    return (lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def check_values(rule, **values) -> None:
    """Values outside a config (a command line's own flags) under one rule, as check_fields checks a
    config's fields: ConfigError for the first that breaks it (None: not given, not checked)."""
    ok, what = rule
    for name, value in values.items():
        if value is not None and not ok(value):
            raise ConfigError(name, value, what)


def checked_overrides(cls, overrides: dict) -> dict:
    """`overrides` if every key is a field of the dataclass `cls`, else ValueError listing the
    valid fields."""
    valid = sorted(f.name for f in fields(cls))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s) {unknown}; valid fields: {', '.join(valid)}"
        )
    return overrides


def check_fields(cfg, rules: dict) -> None:
    """Raise ConfigError for the first field of `cfg` whose value breaks its rule."""
    for name, (ok, what) in rules.items():
        if not ok(getattr(cfg, name)):
            raise ConfigError(name, getattr(cfg, name), what)
