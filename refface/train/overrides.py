"""``key=value`` overrides of any config field from the command line (``loop.max_steps=100``)."""

from __future__ import annotations

import copy
from typing import Any


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (``["a", "b", "c"]``, value parsed as YAML: ``1e-4``, ``true``, ``[1, 2]``)."""
    import yaml

    key, sep, raw = text.partition("=")
    path = [p.strip() for p in key.split(".")]
    if not sep or not key.strip() or any(not p for p in path):
        raise ValueError(f"override {text!r} is not of the form section.key=value (e.g. loop.max_steps=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({e})") from e
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string; a learning rate is meant
            value = float(value)
        except ValueError:
            pass
    return path, value


def apply_overrides(
    config: dict, overrides: list[str] | None, sections: tuple[str, ...] | None = None
) -> dict:
    """A copy of ``config`` with every ``key=value`` override applied (nested by dots).

    Args:
        config: the raw config mapping (e.g. a YAML file's content).
        overrides: ``["loop.max_steps=100", "task.identity_weight=0.2", ...]``.
        sections: when given, the allowed first components (anything else raises).

    Raises:
        ValueError: a malformed override, a section not in ``sections``, or a path through a value
            that is not a mapping. Unknown leaf keys are left to the config classes, which name them.
    """
    out = copy.deepcopy(config)
    for text in overrides or []:
        path, value = parse_override(text)
        if sections is not None and path[0] not in sections:
            raise ValueError(
                f"override {text!r}: unknown section {path[0]!r}; choose from {', '.join(sections)}"
            )
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ValueError(f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out
