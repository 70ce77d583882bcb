"""Calibration data: where the samples come from, checked against the model's inputs.

A :class:`CalibrationData` yields *feeds*: ``dict[input name -> numpy array]``, one model
run each, every array with the input's full rank (batch axis included). Sources:

- an ``.npz`` file (:meth:`CalibrationData.from_npz`): a key named after an input holds
  that input's samples stacked on axis 0 (split into batches of ``batch_size``); keys
  ``"<input>/<i>"`` hold sample ``i`` of that input on its own (ragged shapes, e.g. token
  sequences of different lengths). A one-input model may use any single key.
- a directory of ``.npy`` files (:meth:`CalibrationData.from_dir`): ``<input>.npy`` holds
  stacked samples; any other ``<stem>.npy`` is one sample of a one-input model; for a
  several-input model, ``<sample>.<input>.npy`` files are grouped by ``<sample>``.
- any Python iterable (:meth:`CalibrationData.from_iterable`) of dicts, of tuples (in
  input order), or of single arrays (one-input models).
- :meth:`CalibrationData.random`: seeded random feeds, **for smoke tests only**; the
  quantization report says so, since such ranges say nothing about real inputs.

Every feed is validated on the way out (:func:`check_feed`): an unknown or missing input,
a wrong dtype, a wrong rank or a fixed dim of the wrong size raises
:class:`CalibrationDataError` naming the source, the sample, the input and what the model
expects. Arrays one rank short get a batch axis added.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np


class CalibrationDataError(ValueError):
    """Calibration data that does not fit the model (names source, sample, input, and the expectation)."""


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype, and dims (int for fixed, str/None for symbolic)."""

    name: str
    dtype: np.dtype
    shape: tuple | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join(str(d) if isinstance(d, int) and d >= 0 else
                                                              (d or "?") for d in self.shape) + "]"
        return f"{np.dtype(self.dtype).name} {dims}"


def input_specs(model) -> list[InputSpec]:
    """The inputs a feed must provide (graph inputs without an initializer), from an ir.Model or ModelProto."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        inits = {t.name for t in model.graph.initializer}
        out = []
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            dims = None
            if tt.HasField("shape"):
                dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else
                             (d.dim_param or None) for d in tt.shape.dim)
            out.append(InputSpec(vi.name, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), dims))
        return out
    out = []
    for v in model.graph.inputs:
        if v.const is not None:
            continue
        dims = None if v.shape is None else tuple(d if isinstance(d, int) and d > 0 else (d if isinstance(d, str)
                                                                                         else None)
                                                  for d in v.shape)
        out.append(InputSpec(v.name, v.dtype.to_numpy(), dims))
    return out


def check_feed(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str) -> dict[str, np.ndarray]:
    """Validate one feed against the model inputs; returns it with batch axes added where one rank short.

    Raises:
        CalibrationDataError: unknown/missing input, wrong dtype, rank or fixed dim.
    """
    by_name = {s.name: s for s in specs}
    unknown = [k for k in feed if k not in by_name]
    if unknown:
        raise CalibrationDataError(f"{where}: input {unknown[0]!r} is not an input of the model "
                                   f"(model inputs: {', '.join(repr(s.name) for s in specs)})")
    out = {}
    for s in specs:
        if s.name not in feed:
            raise CalibrationDataError(f"{where}: no data for model input {s.name!r} (expected {s.describe()}); "
                                       f"the sample has {', '.join(repr(k) for k in feed) or 'nothing'}")
        a = np.asarray(feed[s.name])
        if a.dtype != np.dtype(s.dtype):
            raise CalibrationDataError(
                f"{where}: input {s.name!r} has dtype {a.dtype.name}, the model expects {s.describe()} "
                f"(convert the data, e.g. array.astype(np.{np.dtype(s.dtype).name}))")
        if s.shape is not None:
            if a.ndim == len(s.shape) - 1:
                a = a[None]
            if a.ndim != len(s.shape):
                raise CalibrationDataError(f"{where}: input {s.name!r} has shape {list(a.shape)} (rank {a.ndim}), "
                                           f"the model expects {s.describe()} (rank {len(s.shape)})")
            for i, (have, want) in enumerate(zip(a.shape, s.shape)):
                if isinstance(want, int) and want > 0 and have != want:
                    raise CalibrationDataError(f"{where}: input {s.name!r} has shape {list(a.shape)}, the model "
                                               f"expects {s.describe()} (dim {i} must be {want})")
        out[s.name] = a
    return out


class CalibrationData:
    """An iterable of validated feeds for one model.

    Build with the ``from_*`` constructors or :meth:`random`. ``source`` describes where the
    data came from; ``synthetic`` is True for :meth:`random` (smoke tests only).
    """

    def __init__(self, make_iter: Callable[[], Iterator[dict]], source: str, *, synthetic: bool = False,
                 length: int | None = None):
        self._make_iter = make_iter
        self.source = source
        self.synthetic = synthetic
        self.length = length
        self._specs: list[InputSpec] | None = None

    def bind(self, model) -> "CalibrationData":
        """Validate against ``model``'s inputs from now on (an ir.Model or ModelProto)."""
        self._specs = input_specs(model)
        return self

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError(f"{self.source}: length unknown (a generator)")
        return self.length

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        specs = self._specs
        for i, feed in enumerate(self._make_iter()):
            if specs is not None:
                feed = _normalize(feed, specs, f"{self.source}, sample {i}")
                feed = check_feed(feed, specs, f"{self.source}, sample {i}")
            yield feed

    def split(self, n: int) -> tuple["CalibrationData", "CalibrationData"]:
        """(the first ``n`` feeds, the rest) — e.g. calibration and held-out evaluation sets."""
        feeds = list(self._make_iter())
        a, b = feeds[:n], feeds[n:]
        first = CalibrationData(lambda: iter(a), f"{self.source}[:{n}]", synthetic=self.synthetic, length=len(a))
        rest = CalibrationData(lambda: iter(b), f"{self.source}[{n}:]", synthetic=self.synthetic, length=len(b))
        first._specs = rest._specs = self._specs
        return first, rest

    def __repr__(self) -> str:
        n = f", {self.length} feeds" if self.length is not None else ""
        return f"CalibrationData({self.source}{n})"

    # -- sources -------------------------------------------------------------
    @classmethod
    def from_iterable(cls, items: Iterable, source: str = "iterable") -> "CalibrationData":
        """Feeds from dicts, tuples (input order) or single arrays. A list is reused on every pass;
        a one-shot iterator is materialized on the first pass (calibration reads data more than once)."""
        if isinstance(items, (list, tuple)):
            seq = list(items)
            return cls(lambda: iter(seq), source, length=len(seq))
        cache: list = []
        state = {"it": iter(items), "done": False}

        def gen():
            if state["done"]:
                yield from cache
                return
            for x in state["it"]:
                cache.append(x)
                yield x
            state["done"] = True

        return cls(gen, source)

    @classmethod
    def from_npz(cls, path: str | os.PathLike, model=None, batch_size: int = 1) -> "CalibrationData":
        """Feeds from an ``.npz`` file (layout in the module docstring).

        Raises:
            CalibrationDataError: missing file, a file that is not a readable ``.npz`` (truncated,
                another format, object arrays that need pickle), or keys that match no model input.
        """
        path = Path(path)
        if not path.is_file():
            raise CalibrationDataError(f"{path}: no such calibration file")
        key = None
        try:
            with np.load(path, allow_pickle=False) as z:
                if not hasattr(z, "files"):  # np.load read a single .npy array, not an archive
                    raise ValueError("it holds one .npy array, not an .npz archive")
                arrays = {}
                for key in z.files:
                    arrays[key] = z[key]
        except Exception as e:  # noqa: BLE001 — zipfile, zlib, numpy and OS errors by numpy version
            raise CalibrationDataError(f"{path}: {_unreadable(e, key)} (write it with np.savez and numeric "
                                       f"arrays)") from None
        return cls._from_arrays(arrays, str(path), model, batch_size)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, model=None, batch_size: int = 1) -> "CalibrationData":
        """Feeds from a directory of ``.npy`` files (layout in the module docstring).

        Raises:
            CalibrationDataError: missing directory, no ``.npy`` files, or names that match no input.
        """
        path = Path(path)
        if not path.is_dir():
            raise CalibrationDataError(f"{path}: no such calibration directory")
        files = sorted(path.glob("*.npy"))
        if not files:
            raise CalibrationDataError(f"{path}: holds no .npy files")
        arrays = {}
        names = [s.name for s in input_specs(model)] if model is not None else []
        for f in files:
            stem = f.name[:-4]
            key = stem
            if stem not in names:
                for n in names:
                    if stem.endswith("." + n):
                        key = f"{n}/{stem[:-len(n) - 1]}"
                        break
                else:
                    key = f"{names[0]}/{stem}" if len(names) == 1 else stem
            try:
                arrays[key] = np.load(f, allow_pickle=False)
            except Exception as e:  # noqa: BLE001 — numpy and OS errors by numpy version
                raise CalibrationDataError(f"{f}: {_unreadable(e, None)} (write it with np.save and a numeric "
                                           f"array)") from None
            if not isinstance(arrays[key], np.ndarray):  # np.load of a zip archive named .npy
                arrays[key].close()
                raise CalibrationDataError(f"{f}: is an .npz archive, not an .npy array (rename it .npz and "
                                           f"pass it as --calibration FILE.npz)")
        return cls._from_arrays(arrays, str(path), model, batch_size)

    @classmethod
    def _from_arrays(cls, arrays: dict, source: str, model, batch_size: int) -> "CalibrationData":
        specs = input_specs(model) if model is not None else None
        names = [s.name for s in specs] if specs is not None else sorted({k.split("/")[0] for k in arrays})
        if specs is not None and len(specs) == 1 and len(arrays) == 1:
            (only,) = arrays
            if "/" not in only or only.split("/")[0] != names[0]:
                arrays = {names[0]: arrays[only]}
        stacked = {k: v for k, v in arrays.items() if k in names}
        per_sample: dict[str, dict[str, np.ndarray]] = {}
        for k, v in arrays.items():
            if k in stacked:
                continue
            m = re.fullmatch(r"(.+)/([^/]+)", k)
            if m is None or m.group(1) not in names:
                raise CalibrationDataError(f"{source}: array {k!r} matches no model input (model inputs: "
                                           f"{', '.join(repr(n) for n in names)}; name arrays '<input>' for "
                                           f"stacked samples or '<input>/<sample>' for single samples)")
            per_sample.setdefault(m.group(2), {})[m.group(1)] = v
        feeds: list[dict] = []
        if stacked:
            missing = [n for n in names if n not in stacked]
            if missing and not per_sample:
                raise CalibrationDataError(f"{source}: no data for model input {missing[0]!r}")
            counts = {k: len(v) if np.ndim(v) else 1 for k, v in stacked.items()}
            if len(set(counts.values())) > 1:
                raise CalibrationDataError(f"{source}: inputs have different sample counts on axis 0: {counts}")
            n = next(iter(counts.values()))
            rank = {s.name: len(s.shape) for s in specs if s.shape is not None} if specs is not None else {}
            for begin in range(0, n, batch_size):
                feed = {}
                for k, v in stacked.items():
                    part = v[begin:begin + batch_size]
                    if k in rank and v.ndim == rank[k] + 1:
                        # samples of full rank stacked on a new axis: join a batch along the model's axis 0
                        part = np.concatenate(list(part), axis=0)
                    feed[k] = part
                feeds.append(feed)
        for key in sorted(per_sample, key=_natural_key):
            feeds.append(per_sample[key])
        return cls(lambda: iter(feeds), source, length=len(feeds))

    @classmethod
    def random(cls, model, n: int = 8, seed: int = 0, dim_sizes: dict[str, int] | None = None) -> "CalibrationData":
        """``n`` seeded random feeds from the input types — a smoke test source only (``synthetic``).

        Floats are standard normal, integers in [0, 10), symbolic dims from ``dim_sizes`` or 2.
        """
        specs = input_specs(model)
        dim_sizes = dim_sizes or {}

        def gen():
            rng = np.random.default_rng(seed)
            for _ in range(n):
                feed = {}
                for s in specs:
                    shape = [d if isinstance(d, int) else dim_sizes.get(d, 2) for d in (s.shape or ())]
                    dt = np.dtype(s.dtype)
                    if dt.kind == "f":
                        feed[s.name] = rng.standard_normal(shape).astype(dt)
                    elif dt.kind in "iu":
                        feed[s.name] = rng.integers(0, 10, size=shape).astype(dt)
                    elif dt.kind == "b":
                        feed[s.name] = rng.random(shape) > 0.5
                    else:
                        raise CalibrationDataError(f"random calibration data: input {s.name!r} has dtype "
                                                   f"{dt.name}, which random data cannot fill")
                yield feed

        data = cls(gen, f"random (seed {seed}, smoke test only)", synthetic=True, length=n)
        return data.bind(model)


def _unreadable(e: Exception, member: str | None) -> str:
    """Why numpy could not read a calibration file, in one line."""
    what = f"array {member!r} cannot be read" if member is not None else "not a readable numpy file"
    msg = " ".join(str(e).split())
    if "pickle" in msg:  # object arrays, or bytes numpy took for a pickle: never unpickled (arbitrary code)
        msg = "holds pickled (object) data or is not a numpy file at all, and pickles are not loaded"
    return f"{what}: {msg or type(e).__name__}"


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _normalize(feed, specs: Sequence[InputSpec], where: str) -> dict:
    if isinstance(feed, Mapping):
        return dict(feed)
    if isinstance(feed, np.ndarray) or np.isscalar(feed) or _is_torch_tensor(feed):
        if len(specs) != 1:
            raise CalibrationDataError(f"{where}: a single array was given but the model has {len(specs)} inputs "
                                       f"({', '.join(repr(s.name) for s in specs)}); yield dicts name -> array")
        return {specs[0].name: _to_numpy(feed)}
    if isinstance(feed, (tuple, list)):
        if len(feed) != len(specs):
            raise CalibrationDataError(f"{where}: {len(feed)} arrays given, the model has {len(specs)} inputs "
                                       f"({', '.join(repr(s.name) for s in specs)})")
        return {s.name: _to_numpy(a) for s, a in zip(specs, feed)}
    raise CalibrationDataError(f"{where}: a sample must be a dict name -> array, a tuple of arrays or an array, "
                               f"got {type(feed).__name__}")


def _is_torch_tensor(x) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy(x) -> np.ndarray:
    if _is_torch_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def as_calibration_data(data, model) -> CalibrationData:
    """Coerce ``data`` (a path to .npz / a directory, a CalibrationData, or an iterable) and bind it to ``model``.

    Raises:
        CalibrationDataError: a path that is neither an .npz file nor a directory.
    """
    if isinstance(data, CalibrationData):
        return data.bind(model)
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_dir():
            return CalibrationData.from_dir(p, model).bind(model)
        if p.suffix == ".npz" or p.is_file():
            return CalibrationData.from_npz(p, model).bind(model)
        raise CalibrationDataError(f"{p}: no such calibration file or directory (give an .npz file or a directory "
                                   f"of .npy files)")
    if isinstance(data, Mapping):
        return CalibrationData._from_arrays(dict(data), "dict", model, 1).bind(model)
    return CalibrationData.from_iterable(data).bind(model)
