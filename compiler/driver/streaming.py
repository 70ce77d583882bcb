"""Compiling models whose weights stay in their external data files (issue 11).

A model loaded with ``lazy=True`` (:func:`graft.ir.onnx_io.load_proto`) keeps each weight in
its data file, memory-mapped when a rule reads it. :func:`graft.compiler.driver.api.compile`
then never builds an in-memory copy of the model: it checks the output by writing it once,
with external data, to a staging folder (:class:`StagedOutput`), runs ``onnx.checker`` and
onnxruntime on that file, and :meth:`~graft.compiler.driver.api.CompileResult.save` copies it
to its destination file to file.

Memory (:func:`memory_problem`): rewriting holds at most a few weights at a time plus the
weights it creates, so a compile needs about ``2 × largest tensor + 1 GiB`` besides the page
cache; verification holds the input model and the output model in two onnxruntime sessions at
once (onnxruntime pre-packs MatMul weights into memory of its own), so it needs about
``input bytes + output bytes + 1 GiB``. Either need beyond what the machine can give is an
error before any work starts.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

GiB = 2**30
WORKING_MEMORY = GiB
"""Memory a compile needs besides its weights: Python, onnx, onnxruntime, the IR of a large graph."""

MEMORY_ENV = "GRAFT_MEMORY_LIMIT"
"""Environment variable: the memory graft may plan with (``24G``, ``512M``, bytes), when less than the machine's."""


def parse_size(text: str) -> int:
    """``"24G"``, ``"1.5GiB"``, ``"512M"``, ``"1000000"`` → bytes (powers of 1024).

    Raises:
        ValueError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text or "")
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 24G, 512M or a number of bytes)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def available_memory() -> tuple[int, str]:
    """(bytes this process may still use, where the figure comes from).

    The least of: ``MemAvailable`` from /proc/meminfo (free memory plus reclaimable cache), the
    cgroup v2 limit minus its usage (a container's budget), and :data:`MEMORY_ENV`. Where none
    is readable (not Linux), physical memory from ``os.sysconf``.

    Raises:
        ValueError: :data:`MEMORY_ENV` is set to something that is not a size.
    """
    found: list[tuple[int, str]] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
                    break
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append((max(int(limit) - used, 0), "the cgroup's memory.max less memory.current"))
    except (OSError, ValueError):
        pass
    env = os.environ.get(MEMORY_ENV)
    if env:
        try:
            found.append((parse_size(env), f"{MEMORY_ENV}={env}"))
        except ValueError as e:
            raise ValueError(f"{MEMORY_ENV}: {e}") from None
    if not found:
        try:
            found.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"))
        except (ValueError, OSError, AttributeError):
            return 1 << 62, "unknown (no limit applied)"
    return min(found)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def output_bytes_estimate(total: int, quantize: str | None) -> int:
    """Bytes of the output's weights (``total`` bytes of float32 in): the input's, or 5 / 9 bits per
    weight for int4 / int8 weight-only formats (the integers plus a float32 scale per block of 32)."""
    if quantize == "weight-only-int4":
        return total * 5 // 32 + 1
    if quantize == "weight-only-int8":
        return total * 9 // 32 + 1
    if quantize in (None, "none"):
        return total
    return total // 3  # int8 weights with float activations: a quarter, plus parameters


def memory_problem(where: str, total: int, largest: tuple[str, int], *, verify: bool,
                   quantize: str | None) -> str | None:
    """Why compiling a model of ``total`` weight bytes (largest tensor ``largest`` = (name, bytes))
    cannot run in the memory available, or None when it can.

    The message names the sizes needed and, when only verification does not fit, ``--no-verify``.
    """
    avail, source = available_memory()
    name, big = largest
    out = output_bytes_estimate(total, quantize)
    new = out if quantize not in (None, "none") else 0
    compile_need = 2 * big + WORKING_MEMORY + new
    if compile_need > avail:
        return (f"{where}: compiling needs about {_gib(compile_need)} of memory (2 × its largest tensor {name!r}, "
                f"{_gib(big)}, + {_gib(WORKING_MEMORY)} working memory" + (f" + {_gib(new)} of new weights" if new
                                                                           else "") +
                f"), but only {_gib(avail)} is available ({source}); free memory or use a larger machine "
                f"(--no-verify does not lower this)")
    if verify:
        verify_need = total + out + WORKING_MEMORY
        if verify_need > avail:
            return (f"{where}: verification holds the input and the output model in onnxruntime at once, about "
                    f"{_gib(verify_need)} ({_gib(total)} + {_gib(out)} of weights + {_gib(WORKING_MEMORY)}), but only "
                    f"{_gib(avail)} is available ({source}); pass --no-verify (verify=False) to compile without "
                    f"the numeric comparison (structural checks still run)")
    return None


class StagedOutput:
    """A compiled model written once, with external data, to a private temporary folder.

    ``path`` is what onnx.checker and onnxruntime read; ``proto`` is its graph with the weights
    left in the staged data file (lazy: :mod:`graft.ir.external_data`), which
    :func:`graft.ir.onnx_io.save_proto` copies to a destination file to file. The folder is
    removed when the object is garbage-collected or the process exits.
    """

    def __init__(self, model, name: str = "model.onnx", parent: str | os.PathLike | None = None):
        from graft.ir.onnx_io import load_proto, save

        self.dir = Path(tempfile.mkdtemp(prefix="graft-stage-", dir=parent))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        try:
            self.path = self.dir / name
            save(model, self.path, external_data=True)
            self.proto = load_proto(self.path, check=False, lazy=True)
        except BaseException:
            self._cleanup()
            raise

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir())

    def remove(self) -> None:
        """Delete the staged files now (the ``proto`` can no longer be saved afterwards)."""
        self._cleanup()
