"""The package's layers hold (ARCHITECTURE.md): no import cycle between files, no private name or private
module used across modules, nothing imported upward, one top-level package, a complete wheel.

The checks read the *installed* package's source files (located through importlib, as a user's
``import graft`` finds them), parse them with :mod:`ast` and build a file → file import graph with
networkx. Every import statement counts: module level, inside functions, under ``TYPE_CHECKING``.
Each checker takes the package roots as an argument, so the tests at the end run it on synthetic
trees (and on a copy of the real one with a defect injected) to show that it catches what it claims.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]

# Layers, bottom to top; a module may import its own layer and the ones listed (ARCHITECTURE.md).
LAYERS = {  # layer → module-name prefix
    "ir": "graft.ir",
    "engine": "graft.compiler.engine",
    "rules": "graft.rules",
    "techniques": "graft.compiler.techniques",
    "driver": "graft.compiler.driver",
}
ALLOWED = {
    "ir": {"ir"},
    "engine": {"ir", "engine"},
    "rules": {"ir", "engine", "rules"},
    "techniques": {"ir", "engine", "rules", "techniques"},
    "driver": {"ir", "engine", "rules", "techniques", "driver"},
    "compiler": {"engine"},  # graft.compiler's __init__ re-exports the engine (the rest it loads by name, lazily)
    "graft": set(),  # graft/__init__.py loads its sub-packages by name, lazily
}
# The source folders that setuptools maps into the one top-level package (pyproject.toml: package-dir).
TOP_LEVEL_FOLDERS = ("ir", "compiler", "rules")


def installed_roots() -> dict[str, Path]:
    """Package name → source folder of the installed ``graft`` (where ``import graft.ir`` reads its files)."""
    import graft
    import graft.compiler
    import graft.ir
    import graft.rules

    roots = {"graft": Path(graft.__file__).resolve().parent}
    for mod in (graft.ir, graft.compiler, graft.rules):
        (folder,) = mod.__path__  # a regular package: exactly one folder
        roots[mod.__name__] = Path(folder).resolve()
    return roots


@dataclass(frozen=True)
class Import:
    """One imported name: ``importer`` (module) reaches ``target`` (module) at ``file:line``."""

    importer: str
    target: str
    line: int
    text: str  # the statement as written, for messages
    name: str = ""  # the name taken by `from target import name` ('' for a module import)
    absolute_top: str = ""  # the first component of an absolute import (to catch `import ir`)


def source_files(roots: dict[str, Path]) -> dict[str, Path]:
    """Module name → file, for every ``.py`` under each root (the root folder is package ``name``)."""
    files: dict[str, Path] = {}
    for pkg, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            # a wheel install puts graft.ir under graft/: the same module name, the same file
            files.setdefault(".".join([pkg, *parts]), path)
    return files


def _package_of(module: str, files: dict[str, Path]) -> str:
    return module if files[module].name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str, files: dict[str, Path]) -> list[Import]:
    """Every import in ``module``'s file, resolved to modules of ``files`` (third-party ones kept too)."""
    tree = ast.parse(files[module].read_text(encoding="utf-8"), filename=str(files[module]))
    out = []
    for node in ast.walk(tree):
        text = ast.unparse(node) if isinstance(node, (ast.Import, ast.ImportFrom)) else ""
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(module, alias.name, node.lineno, text, absolute_top=alias.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module, files).split(".")
                base = base[:len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
                top = ""
            else:
                origin = node.module or ""
                top = origin.split(".")[0]
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                if sub in files:  # `from pkg import submodule`
                    out.append(Import(module, sub, node.lineno, text, absolute_top=top))
                else:
                    out.append(Import(module, origin, node.lineno, text, name=alias.name, absolute_top=top))
    return out


def all_imports(roots: dict[str, Path]) -> tuple[dict[str, Path], list[Import]]:
    files = source_files(roots)
    return files, [imp for m in sorted(files) for imp in imports_of(m, files)]


def import_graph(roots: dict[str, Path]) -> nx.DiGraph:
    """File → file imports between the package's own modules (nodes are module names)."""
    files, imports = all_imports(roots)
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for imp in imports:
        if imp.target in files and imp.target != imp.importer:
            g.add_edge(imp.importer, imp.target, line=imp.line)
    return g


def cycles(roots: dict[str, Path]) -> list[str]:
    """One line per group of files that import each other (a strongly connected component), with one cycle."""
    files = source_files(roots)
    g = import_graph(roots)
    out = []
    for comp in sorted((c for c in nx.strongly_connected_components(g) if len(c) > 1), key=sorted):
        cyc = nx.find_cycle(g.subgraph(comp))
        path = " -> ".join(f"{_rel(files[a], roots)}:{g.edges[a, b]['line']}" for a, b in cyc)
        out.append(f"{len(comp)} files import each other ({', '.join(_rel(files[m], roots) for m in sorted(comp))})"
                   f"; one cycle: {path} -> {_rel(files[cyc[0][0]], roots)}")
    return out


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_imports(roots: dict[str, Path]) -> list[str]:
    """Private names imported from another graft module, and private graft modules imported from
    outside the package that holds them."""
    files, imports = all_imports(roots)
    out = []
    for imp in imports:
        if imp.target != "graft" and not imp.target.startswith("graft."):
            continue  # third-party (onnx, torch): not this test's business
        where = f"{_rel(files[imp.importer], roots)}:{imp.line}: {imp.text}"
        if imp.name and _private(imp.name) and imp.target != imp.importer:
            out.append(f"{where}: imports private name {imp.name!r} from {imp.target}")
        parts = imp.target.split(".")
        first = next((i for i, p in enumerate(parts) if _private(p)), None)
        if first is not None:
            owner = ".".join(parts[:first])
            if imp.importer != owner and not imp.importer.startswith(owner + "."):
                out.append(f"{where}: imports private module {imp.target} from outside {owner}")
    return out


def layer_of(module: str) -> str:
    for layer, prefix in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    if module == "graft.compiler":
        return "compiler"
    if module == "graft.__main__":  # `python -m graft`: the CLI, so the driver layer
        return "driver"
    if module == "graft":
        return "graft"
    return "other"


def layer_violations(roots: dict[str, Path]) -> list[str]:
    """Imports that go up a layer or sideways, imports of the graft.compiler facade from inside the
    package, and absolute imports of the old top-level names (``import ir``)."""
    files, imports = all_imports(roots)
    out = []
    for imp in imports:
        where = f"{_rel(files[imp.importer], roots)}:{imp.line}: {imp.text}"
        if imp.absolute_top in TOP_LEVEL_FOLDERS:
            out.append(f"{where}: imports top-level {imp.absolute_top!r}; inside the package it is "
                       f"graft.{imp.absolute_top}")
            continue
        if imp.target not in files:
            continue
        src, dst = layer_of(imp.importer), layer_of(imp.target)
        if dst == "graft":
            continue  # the top package imports nothing of graft (ALLOWED): any layer may read graft.__version__
        if dst == "compiler":
            out.append(f"{where}: imports the graft.compiler facade (for users); import the engine from "
                       f"graft.compiler.engine")
        elif src in ALLOWED and dst not in ALLOWED[src] and dst != "other":
            out.append(f"{where}: the {src} layer may import only {sorted(ALLOWED[src]) or 'nothing'} of graft, "
                       f"not the {dst} layer ({imp.target})")
        elif src == "other" or dst == "other":
            out.append(f"{where}: {imp.importer if src == 'other' else imp.target} belongs to no layer "
                       f"(add it to LAYERS in tests/test_architecture.py and to ARCHITECTURE.md)")
    return out


def _rel(path: Path, roots: dict[str, Path]) -> str:
    top = Path(os.path.commonpath([str(p) for p in roots.values()]))
    return str(path.relative_to(top))


def pyproject_packages(repo: Path) -> tuple[list[str], list[str]]:
    """(packages missing from pyproject's ``[tool.setuptools] packages``, listed ones with no folder).

    A package is every folder holding an ``__init__.py`` under the folders ``package-dir`` maps.
    """
    import tomllib  # Python 3.11+; only this check needs it

    conf = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = set()
    for pkg, folder in conf["package-dir"].items():
        for init in (repo / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(repo / folder).parts
            found.add(".".join([pkg, *rel]))
    return sorted(found - listed), sorted(listed - found)


# ----------------------------------------------------------------------------- the real package
def test_installed_package_is_read_from_its_source_folders():
    roots = installed_roots()
    files = source_files(roots)
    assert {"graft", "graft.ir", "graft.ir.onnx_io", "graft.compiler.engine.rewriter", "graft.rules.fold_batchnorm",
            "graft.compiler.driver.cli"} <= set(files)
    g = import_graph(roots)
    # a known edge, so an empty graph cannot pass the checks below
    assert g.has_edge("graft.rules.fold_batchnorm", "graft.compiler.engine")
    assert g.number_of_edges() > 200


def test_no_import_cycle_between_files():
    found = cycles(installed_roots())
    assert not found, "import cycles:\n" + "\n".join(found)


def test_no_private_name_or_module_across_modules():
    found = private_imports(installed_roots())
    assert not found, "private imports:\n" + "\n".join(found)


def test_layers_import_only_downward():
    found = layer_violations(installed_roots())
    assert not found, "layer violations:\n" + "\n".join(found)


def test_public_imports_work_and_old_top_level_names_do_not(tmp_path):
    """From a directory outside the source tree: the public names import, ``import ir`` does not."""
    code = textwrap.dedent("""
        import graft
        from graft.compiler import compile, Rule, Var, op
        from graft.rules import fold_batchnorm
        print(graft.ir.load.__module__, compile.__module__, Rule.__module__, fold_batchnorm.__name__)
        for name in ("ir", "compiler", "rules"):
            try:
                __import__(name)
            except ModuleNotFoundError as e:
                print("missing", e.name)
            else:
                print("found", name)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n") == ["graft.ir.onnx_io graft.compiler.driver.api graft.compiler.engine.rule "
                                      "graft.rules.fold_batchnorm", "missing ir", "missing compiler",
                                      "missing rules", ""]


def test_pyproject_lists_every_package():
    missing, extra = pyproject_packages(REPO)
    assert (missing, extra) == ([], []), f"pyproject.toml [tool.setuptools] packages: add {missing}, remove {extra}"


# ----------------------------------------------------------------------------- the checkers catch defects
def _tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    """A synthetic package: files by path under ``root`` (graft/, ir/, compiler/, rules/), roots mapped as
    pyproject maps them."""
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    for folder in ("graft", "ir", "compiler", "rules"):
        (root / folder).mkdir(exist_ok=True)
        (root / folder / "__init__.py").touch()
    return {"graft": root / "graft", "graft.ir": root / "ir", "graft.compiler": root / "compiler",
            "graft.rules": root / "rules"}


def test_cycle_checker_finds_a_cycle_through_relative_and_function_level_imports(tmp_path):
    roots = _tree(tmp_path, {
        "ir/a.py": "from .b import thing\n",
        "ir/b.py": "def f():\n    from graft.ir import c\n",
        "ir/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
        "ir/d.py": "from graft.ir.a import thing\n",  # reaches the cycle, is not part of it
    })
    (found,) = cycles(roots)
    assert found.startswith("3 files import each other (ir/a.py, ir/b.py, ir/c.py)")
    assert "ir/d.py" not in found


def test_private_checker_finds_private_names_and_modules(tmp_path):
    roots = _tree(tmp_path, {
        "ir/_core.py": "X = 1\n_Y = 2\n",
        "ir/public.py": "from graft.ir._core import X\n",  # own package: fine
        "ir/sub/__init__.py": "",
        "ir/sub/deep.py": "from graft.ir import _core\n",  # a sub-package of the owner: fine
        "compiler/engine/__init__.py": "",
        "compiler/engine/x.py": "from graft.ir._core import X\nfrom graft.ir.public import _hidden\n"
                                "import graft.ir._core\n",
        "rules/r.py": "from graft.ir._core import _Y\nfrom onnx.helper import _private_ok\n",
    })
    found = private_imports(roots)
    assert [f.split(": ", 1)[0] for f in found] == [
        "compiler/engine/x.py:1", "compiler/engine/x.py:2", "compiler/engine/x.py:3", "rules/r.py:1", "rules/r.py:1"]
    assert "private name '_hidden' from graft.ir.public" in found[1]
    assert "private module graft.ir._core from outside graft.ir" in found[2]
    assert "private name '_Y'" in found[3] and "private module graft.ir._core" in found[4]


def test_layer_checker_finds_upward_and_facade_and_top_level_imports(tmp_path):
    roots = _tree(tmp_path, {
        "ir/a.py": "def f():\n    from graft.rules import r\n",
        "compiler/engine/__init__.py": "from graft.compiler.engine.m import M\n",
        "compiler/engine/m.py": "from graft.ir import a\nM = 1\n",
        "compiler/techniques/__init__.py": "",
        "compiler/techniques/t.py": "from graft.compiler import M\nfrom graft.rules.r import R\n",
        "compiler/driver/__init__.py": "",
        "compiler/driver/d.py": "from graft.compiler.techniques import t\nimport ir\n",
        "rules/r.py": "from graft.compiler.engine import M\nfrom graft.compiler.techniques.t import T\nR = 1\n",
    })
    found = layer_violations(roots)
    assert [f.split(": ", 1)[0] for f in found] == [
        "compiler/driver/d.py:2", "compiler/techniques/t.py:1", "ir/a.py:2", "rules/r.py:2"]
    assert "top-level 'ir'" in found[0] and "facade" in found[1]
    assert "the ir layer may import only ['ir'] of graft, not the rules layer" in found[2]
    assert "the rules layer may import only ['engine', 'ir', 'rules'] of graft, not the techniques layer" in found[3]


def test_checkers_catch_a_cycle_and_an_upward_import_injected_into_a_copy_of_the_real_package(tmp_path):
    real = installed_roots()
    roots = {}
    for pkg, folder in real.items():
        dest = tmp_path / folder.name
        shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("__pycache__"))
        roots[pkg] = dest
    # what the copy finds before the edit is what the real tree has (the tests above report it)
    cycles_before, layers_before = set(cycles(roots)), set(layer_violations(roots))
    with open(roots["graft.ir"] / "dtypes.py", "a") as f:  # dtypes is imported by the IR core: a cycle
        f.write("\n\ndef _late():\n    from graft.ir import onnx_io  # noqa\n")
    with open(roots["graft.compiler"] / "engine" / "rule.py", "a") as f:
        f.write("\n\ndef _late():\n    from graft.rules import RULE_MODULES  # noqa\n")
    (cyc,) = set(cycles(roots)) - cycles_before
    assert "ir/dtypes.py" in cyc and "ir/onnx_io.py" in cyc
    (up,) = set(layer_violations(roots)) - layers_before
    assert up.startswith("compiler/engine/rule.py:") and "not the rules layer (graft.rules)" in up


def test_pyproject_check_finds_a_package_folder_missing_from_the_list(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for folder in ("graft", *TOP_LEVEL_FOLDERS):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    missing, extra = pyproject_packages(tmp_path)  # the real tree's state (test_pyproject_lists_every_package)
    (tmp_path / "compiler" / "techniques" / "distill").mkdir()
    (tmp_path / "compiler" / "techniques" / "distill" / "__init__.py").touch()
    shutil.rmtree(tmp_path / "compiler" / "driver" / "cli")
    assert pyproject_packages(tmp_path) == (sorted([*missing, "graft.compiler.techniques.distill"]),
                                            sorted([*extra, "graft.compiler.driver.cli"]))
