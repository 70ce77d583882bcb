"""``graft compile --torch package.module:factory --input-shape 1x3x224x224``: the torch model to compile.

The factory is called without arguments and returns a ``torch.nn.Module`` (or a
``torch.fx.GraphModule``), or a tuple ``(module, example_inputs)``.
``--input-shape`` (repeatable, one per positional input) overrides the factory's
inputs: ``2x3x32x32`` is float32 from a standard normal, ``2x16:int64`` integers in
[0, 10) (token ids); seeded, so runs repeat. torch is imported only here.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback

from graft.compiler.driver.cli._errors import fail

_DTYPES = ("float32", "float16", "float64", "bfloat16", "int64", "int32", "int8", "uint8", "bool")


def parse_shape(text: str) -> tuple[tuple[int, ...], str]:
    """``"1x3x224x224"`` → ((1, 3, 224, 224), "float32"); ``"2x16:int64"`` → ((2, 16), "int64")."""
    shape, _, dtype = text.partition(":")
    dtype = dtype or "float32"
    dims = shape.lower().split("x") if shape else []
    if not dims or not all(d.isdigit() and int(d) > 0 for d in dims) or dtype not in _DTYPES:
        fail(f"--input-shape {text}: expected dims joined by 'x' with an optional dtype, e.g. 1x3x224x224 or "
             f"2x16:int64 (dtypes: {', '.join(_DTYPES)})")
    return tuple(int(d) for d in dims), dtype


def load_factory(spec: str):
    """The callable named by ``package.module:factory`` (the current directory is importable)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        fail(f"--torch {spec}: expected package.module:factory (e.g. examples.torch_models:resnet_style)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            fail(f"--torch {spec}: cannot import {mod_name!r} ({e}); run graft from the directory that holds it "
                 f"or install the package")
        fail(f"--torch {spec}: {_where(e)}importing {mod_name} raised {type(e).__name__}: {e} (install the missing "
             f"package, or fix the import)")
    except SyntaxError as e:
        where = f"{e.filename}:{e.lineno}: " if e.filename and e.lineno else ""
        fail(f"--torch {spec}: {where}SyntaxError: {e.msg} (fix the module)")
    except Exception as e:  # noqa: BLE001 — user code raised while being imported: report it on one line
        fail(f"--torch {spec}: {_where(e)}importing {mod_name} raised {type(e).__name__}: {e} (fix the module)")
    except SystemExit as e:
        fail(f"--torch {spec}: {_where(e)}importing {mod_name} called sys.exit({e.code!r}) (a model module must "
             f"not exit when imported)")
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        names = ", ".join(n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n)))
        fail(f"--torch {spec}: {mod_name} has no callable {attr!r} (callables there: {names})")
    return fn


def _where(exc: BaseException) -> str:
    """``file:line: `` in the user's module where ``exc`` was raised, or ``""``.

    The user's module is the first file the traceback enters after this one and Python's
    import machinery; the line is the deepest frame in that file (the statement that raised,
    or the call into a library that did).
    """
    machinery = os.path.dirname(importlib.__file__) + os.sep
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(("<", machinery)) and f.filename != __file__]
    if not frames:
        return ""
    user = frames[0].filename
    last = [f for f in frames if f.filename == user][-1]
    return f"{last.filename}:{last.lineno}: "


def factory_files(spec: str) -> list[str]:
    """The source files of the module ``package.module:factory`` names and of the packages
    above it (``package/__init__.py``: imported too), all imported already by
    :func:`load_factory`; namespace packages and built-ins have none."""
    parts = spec.partition(":")[0].split(".")
    files = (getattr(sys.modules.get(".".join(parts[:i])), "__file__", None) for i in range(len(parts), 0, -1))
    return [f for f in files if f]


def torch_model(spec: str, input_shapes: tuple[str, ...], fn=None):
    """(module, example inputs) from the factory and ``--input-shape``.

    ``fn``: the factory when :func:`load_factory` already found it.
    Ends the process with a one-line error when the factory fails, returns something
    that is not a module, or no inputs are known.
    """
    import torch

    if fn is None:
        fn = load_factory(spec)
    try:
        got = fn()
    except Exception as e:  # noqa: BLE001 — user code: report it on one line
        fail(f"--torch {spec}: {_where(e)}the factory raised {type(e).__name__}: {e}")
    module, inputs = (got if isinstance(got, tuple) and len(got) == 2 else (got, None))
    if not isinstance(module, (torch.nn.Module, torch.export.ExportedProgram)):
        fail(f"--torch {spec}: the factory returned {type(module).__name__}; it must return a torch.nn.Module "
             f"or (module, example_inputs)")
    if input_shapes:
        g = torch.Generator().manual_seed(0)
        tensors = []
        for text in input_shapes:
            shape, dtype = parse_shape(text)
            dt = getattr(torch, dtype)
            if dt.is_floating_point:
                tensors.append(torch.randn(shape, generator=g).to(dt))
            elif dt == torch.bool:
                tensors.append(torch.rand(shape, generator=g) > 0.5)
            else:
                tensors.append(torch.randint(0, 10, shape, generator=g).to(dt))
        inputs = tuple(tensors)
    if inputs is None:
        fail(f"--torch {spec}: no example inputs; pass --input-shape (e.g. --input-shape 1x3x224x224) or "
             f"return (module, example_inputs) from the factory")
    return module, inputs
