"""graft's built-in rules, one topic a module, and the named pipelines built from them.

Each rule module exposes ``RULES`` (a list of :class:`compiler.Rule`).
"""
from __future__ import annotations

import importlib

# Modules holding built-in rules, in the order ``graft rules`` lists them.
RULE_MODULES = (
    "graft.rules.cleanup",
    "graft.rules.constant_folding",
    "graft.rules.fold_batchnorm",
    "graft.rules.fuse",
    "graft.rules.fuse_bias",
    "graft.rules.fuse_layernorm",
    "graft.rules.fuse_gelu",
    "graft.rules.fuse_attention",
    "graft.rules.precision",
)


def all_rules() -> list:
    """Every built-in :class:`compiler.Rule`, grouped by module, in a stable order."""
    out = []
    for mod in RULE_MODULES:
        out.extend(importlib.import_module(mod).RULES)
    return out


def get(name: str):
    """The built-in rule called ``name``.

    Raises:
        KeyError: no such rule (the message lists close names).
    """
    import difflib

    rules = {r.name: r for r in all_rules()}
    if name in rules:
        return rules[name]
    close = difflib.get_close_matches(name, rules, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `graft rules` lists them"
    raise KeyError(f"no built-in rule named {name!r}{hint}")
