"""A method's options read as its config types them, wherever they come from: `--set KEY=VALUE` on the command line,
a serve config, or one method's options for another (fusion's `base_options`).

Text is read as the option's type (an int option takes "4", a bool "true"); anything else is refused in one line that
names the option and what it takes, before a model loads.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, Mapping, Union, get_args, get_origin, get_type_hints

from tailor.methods.base import Personalizer


class OptionError(ValueError):
    """An option a method does not have, or a value its config refuses; the message names the option.

    `assignment` is the "KEY=VALUE" refused for its type (None otherwise), so a caller can say where it was written
    ("--set k=abc: k must be an integer"); `by_config` says the config's own checks refused the values."""

    def __init__(self, message: str, assignment: str | None = None, by_config: bool = False):
        super().__init__(f"{assignment}: {message}" if assignment else message)
        self.assignment = assignment
        self.by_config = by_config


def typed_options(cls: type[Personalizer], options: Mapping[str, object]) -> dict[str, object]:
    """The options as `cls`'s config types them; an unknown option, a value not of its option's type or not one of a
    Literal's choices, and a value the config's own checks refuse raise OptionError."""
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise OptionError(f"{cls.name} has no option {', '.join(unknown)}; it has {', '.join(sorted(fields))}")
    hints = get_type_hints(cls.config_class)
    typed = {name: typed_value(name, value, hints[name]) for name, value in options.items()}
    try:
        cls.config_class(**typed)  # a config that checks its values says what is wrong before anything loads
    except ValueError as error:
        raise OptionError(str(error), by_config=True) from None
    return typed


def typed_value(name: str, value: object, hint: Any) -> object:
    """`value` as an option of type `hint` (text read as that type)."""
    def refuse(expected: str) -> OptionError:
        shown = str(value).lower() if isinstance(value, bool) else value
        return OptionError(f"{name} must be {expected}", assignment=f"{name}={shown}")

    args = get_args(hint)
    if get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = get_args(hint)
    if get_origin(hint) is Literal:
        text = value if isinstance(value, str) else str(value)
        if text not in args:
            raise refuse(f"one of {', '.join(map(str, args))}")
        return text
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if hint in (int, float):
        accepted = (int,) if hint is int else (int, float)
        if isinstance(value, str):
            try:
                return hint(value)
            except ValueError:
                pass
        elif isinstance(value, accepted) and not isinstance(value, bool):
            return hint(value)
        raise refuse("an integer" if hint is int else "a number")
    if hint is str and not isinstance(value, str):
        return str(value)
    return value


def pairs(texts: list[str], what: str) -> dict[str, str]:
    """"KEY=VALUE" texts as a mapping of text values, dashes in keys read as underscores; `what` names where they
    came from in the error for one without "=" ("--set", "base_options")."""
    options: dict[str, str] = {}
    for text in texts:
        key, sep, raw = text.partition("=")
        if not sep:
            raise OptionError(f"{what} takes KEY=VALUE, got {text!r}")
        options[key.strip().replace("-", "_")] = raw.strip()
    return options


def by_look(options: Mapping[str, str]) -> dict[str, object]:
    """Text values cast by their look (ints, floats, true/false), for code with no method config to read them by
    (a serve config's single-deployment flags, the benchmark scripts); a method's config types them later."""
    looked: dict[str, object] = {}
    for key, raw in options.items():
        value: object = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        looked[key] = value
    return looked
