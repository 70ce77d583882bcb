"""Load a user's rule file (``graft compile --rules my_rules.py``).

The file is imported as a fresh module (never added to ``sys.modules`` under a
name that could shadow a real package). Its rules are the module's ``RULES``
list when it defines one, else every :class:`graft.compiler.Rule` bound at module
level, in definition order.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import re
import sys
import traceback
from pathlib import Path

from graft.compiler.engine.pattern import PatternError
from graft.compiler.engine.rule import Rule

_counter = itertools.count()
# Real paths of the rule files loaded so far: an exception whose traceback runs through one
# of them (a pattern predicate, say) is the user's rule's fault, not graft's (see user_frame).
_LOADED: set[str] = set()


class UserRuleFileError(ValueError):
    """A rule file that is missing, fails to import, or defines no rules.

    The message starts with ``file:line`` where the fault is known.
    """


def _where(path: Path, exc: BaseException) -> str:
    """``file:line`` of the deepest frame of ``exc``'s traceback inside ``path``."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"{path}:{exc.lineno}"
    line = None
    target = os.path.realpath(path)
    for fs in traceback.extract_tb(exc.__traceback__):
        if os.path.realpath(fs.filename) == target:
            line = fs.lineno
    return f"{path}:{line}" if line is not None else str(path)


# Top-level modules graft had before it became one package (graft.compiler, graft.ir, graft.rules).
_OLD_TOP = ("compiler", "ir", "rules")


def _new_module(old: str, sub: str) -> str:
    """Where the old module ``old + sub`` (``compiler`` + ``.pattern``) lives in the graft package:
    ``graft.compiler``'s modules moved into its layers (``engine``, ``techniques``, ``driver``)."""
    import importlib.util

    layers = ("", ".engine", ".techniques", ".driver") if old == "compiler" else ("",)
    for layer in layers:
        name = f"graft.{old}{layer}{sub}"
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ImportError:  # a parent that is a module, not a package
            continue
    return f"graft.{old}{sub}"


def _new_import(line: str, old: str) -> str:
    """``line`` (an import statement) rewritten to the graft package's names."""
    stmt = line.strip()
    m = re.match(rf"from\s+{old}(\.[\w.]+)?\s+import\s+(.+)", stmt)
    if m:
        return f"from {_new_module(old, m.group(1) or '')} import {m.group(2)}"
    m = re.match(rf"import\s+{old}(\.[\w.]+)?(\s+as\s+\w+)?\s*$", stmt)
    if m and m.group(1):
        return f"import {_new_module(old, m.group(1))}{m.group(2) or ''}"
    if m:
        return f"from graft import {old}{m.group(2) or ''}"
    return {"compiler": "from graft.compiler import Rule, Var, op", "ir": "from graft import ir",
            "rules": "from graft.rules import ..."}[old]


def _moved_message(path: Path, line: int | None, old: str) -> str:
    import linecache

    src = linecache.getline(str(path), line) if line else ""
    where = f"{path}:{line}" if line else str(path)
    return (f"{where}: the module {old!r} moved into the graft package; write `{_new_import(src, old)}` "
            f"(graft.compiler, graft.ir and graft.rules replace compiler, ir and rules)")


def _moved_import(path: Path, e: ImportError) -> str | None:
    """The one-line message for an import of a pre-``graft.*`` module name, else None."""
    name = getattr(e, "name", None) or ""
    old = name.split(".")[0]
    if old not in _OLD_TOP:
        return None
    where = _where(path, e)
    line = int(where.rsplit(":", 1)[1]) if where != str(path) else None
    return _moved_message(path, line, old)


def _stale_imports(path: Path) -> str | None:
    """A message when the file imported an old top-level name (``from compiler import Rule``) that
    resolved to graft's own source folder — possible only when the folder holding graft's sources
    is on ``sys.path`` (running from a source checkout) — else None.

    Such an import loads a second copy of graft's modules under another name; it works in that
    folder only, so it is refused everywhere, as it fails everywhere else.
    """
    import ast

    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (SyntaxError, ValueError, OSError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops = [node.module.split(".")[0]]
        elif isinstance(node, ast.Import):
            tops = [a.name.split(".")[0] for a in node.names]
        else:
            continue
        for top in tops:
            if top in _OLD_TOP and _is_graft_folder(sys.modules.get(top), top):
                return _moved_message(path, node.lineno, top)
    return None


def _is_graft_folder(module, top: str) -> bool:
    """True when ``module`` (the top-level ``compiler``/``ir``/``rules``) is graft's ``graft.<top>`` source."""
    import importlib

    f = getattr(module, "__file__", None)
    if f is None:
        return False
    ours = getattr(importlib.import_module(f"graft.{top}"), "__file__", None)
    return ours is not None and os.path.realpath(f) == os.path.realpath(ours)


def load_rule_file(path: str | os.PathLike) -> list[Rule]:
    """Import ``path`` and return its rules.

    Returns:
        the ``RULES`` list if the module defines one, else all module-level
        :class:`Rule` objects in definition order.

    Raises:
        UserRuleFileError: missing file, import error (``file:line: ErrorType: message``; an
            import of the old top-level names ``compiler``/``ir``/``rules``: the ``graft.*``
            import to write instead), a ``RULES`` entry that is not a Rule, or no rules at all.
    """
    path = Path(path)
    if path.is_dir():
        raise UserRuleFileError(f"{path}: is a directory, expected a .py rule file")
    if not path.is_file():
        raise UserRuleFileError(f"{path}: no such rule file")
    mod_name = f"graft_user_rules_{next(_counter)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UserRuleFileError(f"{path}: cannot be imported as Python (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    # dataclasses / pickling look the module up by name while it executes
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except PatternError as e:  # RuleDefinitionError included: a malformed pattern or rule
        msg = re.sub(r"^\S+:\d+: ", "", str(e))  # the location is given once, in front
        raise UserRuleFileError(f"{_where(path, e)}: invalid rule: {msg}") from e
    except SystemExit as e:  # sys.exit() in a rule file must not end graft silently
        raise UserRuleFileError(f"{_where(path, e)}: the rule file called sys.exit({e.code!r}) while being "
                                f"imported (a rule file only defines rules)") from e
    except ImportError as e:
        moved = _moved_import(path, e)
        if moved:
            raise UserRuleFileError(moved) from e
        raise UserRuleFileError(f"{_where(path, e)}: importing the rule file raised "
                                f"{type(e).__name__}: {e}") from e
    except Exception as e:  # noqa: BLE001 — any import-time failure is the user's file's fault
        raise UserRuleFileError(f"{_where(path, e)}: importing the rule file raised "
                                f"{type(e).__name__}: {e}") from e
    finally:
        sys.modules.pop(mod_name, None)
    stale = _stale_imports(path)
    if stale:
        raise UserRuleFileError(stale)
    _LOADED.add(os.path.realpath(path))
    if hasattr(module, "RULES"):
        if isinstance(module.RULES, (Rule, str, bytes)) or not hasattr(module.RULES, "__iter__"):
            raise UserRuleFileError(f"{path}: RULES is {type(module.RULES).__name__} {module.RULES!r}; it must be a "
                                    f"list of graft.compiler.Rule")
        rules = list(module.RULES)
        for i, r in enumerate(rules):
            if not isinstance(r, Rule):
                raise UserRuleFileError(f"{path}: RULES[{i}] is {type(r).__name__} {r!r}, not a graft.compiler.Rule")
    else:
        rules = list(dict.fromkeys(v for v in vars(module).values() if isinstance(v, Rule)))
    if not rules:
        raise UserRuleFileError(f"{path}: defines no graft.compiler.Rule (define rules at module level "
                                f"or list them in RULES)")
    return rules


def load_rule_files(paths) -> list[Rule]:
    """Rules of several files, in order. Raises :class:`UserRuleFileError` (see :func:`load_rule_file`)."""
    out: list[Rule] = []
    for p in paths:
        out.extend(load_rule_file(p))
    return out


def user_frame(exc: BaseException) -> str | None:
    """``file:line`` of the deepest frame of ``exc``'s traceback inside a loaded rule file, or None.

    Tells a fault in a user's rule (a ``Const``/attribute predicate that raises while the
    matcher runs it, say) from a fault in graft.
    """
    where = None
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # the raising frame may sit in a chained exception
        seen.add(id(e))
        for fs in traceback.extract_tb(e.__traceback__):
            if os.path.realpath(fs.filename) in _LOADED:
                where = f"{fs.filename}:{fs.lineno}"
        if where is not None:
            return where
        e = e.__cause__ or e.__context__
    return None
