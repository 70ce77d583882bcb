"""Channel-analysis rules for ops that move axes: Reshape, Flatten, Transpose, (Un)Squeeze,
Concat, Split, Slice, Expand, Tile (ONNX semantics, https://onnx.ai/onnx/operators/).

A Reshape is read as groups of input axes whose product equals a group of output
axes. Merging channel × spatial into one axis (Flatten before a linear layer)
repeats each channel's atom over its spatial block; splitting a hidden dim into
(heads, head size) — or (q/k/v, heads, head size) — unites each head's positions, so
heads are removed whole; after the walk, :func:`rectangularize` makes sure every such
block can only lose whole slices along one axis, so every kept mask stays rectangular. A target shape's literals on a carried axis are
rewritten at removal; run-time dims (``Shape(x)[k]``) must read an axis carrying the
same classes, or the reshape blocks.
"""
from __future__ import annotations

import numpy as np

from graft.compiler.techniques.pruning import shape_values as sv
from graft.compiler.techniques.pruning.analyzer import Analyzer, Origin, node_label
from graft.compiler.techniques.pruning.layout import Layout
from graft.compiler.techniques.pruning.ops_common import join, to_joint
from graft.ir import Node


def _segments(ish: tuple, osh: tuple) -> list | None:
    """Pairs (input axes, output axes) with equal products, covering both shapes in order."""
    i = j = 0
    segs = []
    while i < len(ish) or j < len(osh):
        ia, oa, pi, pj = [], [], 1, 1
        if i < len(ish):
            ia.append(i)
            pi = ish[i]
            i += 1
        if j < len(osh):
            oa.append(j)
            pj = osh[j]
            j += 1
        while pi != pj:
            if pi < pj:
                if i >= len(ish):
                    return None
                ia.append(i)
                pi *= ish[i]
                i += 1
            else:
                if j >= len(osh):
                    return None
                oa.append(j)
                pj *= osh[j]
                j += 1
        segs.append((ia, oa))
    return segs


def _signature(an: Analyzer, lay: Layout, axis: int) -> tuple:
    """Per index along ``axis``: the set of classes there. Equal signatures shrink equally."""
    roots = an.cls.roots(lay.atoms)
    p = lay.axes.index(axis)
    return tuple(frozenset(np.take(roots, i, axis=p).ravel().tolist()) for i in range(roots.shape[p]))


def map_reshape(an: Analyzer, node: Node, lay: Layout, ish: tuple, osh: tuple) -> Layout | None:
    """The output layout of a reshape from ``ish`` to ``osh``, or None (blocked)."""
    segs = _segments(ish, osh)
    if segs is None or any(d == 0 for d in (*ish, *osh)):
        an.block(lay.atoms, f"{node_label(node)}: cannot match {list(ish)} to {list(osh)}")
        return None
    seg = [s for s in segs if any(a in lay.axes for a in s[0])]
    moved = {}
    for ia, oa in seg:  # axes that only move (same size, maybe with 1s around): remap them
        ia1, oa1 = [i for i in ia if ish[i] > 1], [o for o in oa if osh[o] > 1]
        if len(ia1) == 1 and len(oa1) == 1 and ia1[0] in lay.axes:
            moved[ia1[0]] = oa1[0]
    if len(moved) == len(lay.axes):
        return Layout(tuple(moved[a] for a in lay.axes), lay.atoms, lay.cval, lay.static)
    if len(seg) != 1 or any(a not in seg[0][0] for a in lay.axes):
        an.block(lay.atoms, f"{node_label(node)} spreads the channel axes {lay.axes} over several output axes")
        return None
    ia, oa = seg[0]
    ia_use = [i for i in ia if ish[i] > 1 or i in lay.axes]
    oa_use = [o for o in oa if osh[o] > 1]
    if len(oa_use) == 1:  # merge (channel x spatial blocks), or the same axis moved
        shape = tuple(ish[i] for i in ia_use)
        atoms = np.array(to_joint(lay.atoms, list(lay.axes), ia_use, shape)).ravel()
        cval = np.array(to_joint(lay.cval, list(lay.axes), ia_use, shape)).ravel()
        static = np.array(to_joint(lay.static, list(lay.axes), ia_use, shape)).ravel()
        return Layout((oa_use[0],), atoms, cval, static)
    if len(ia_use) == 1 and len(oa_use) > 1:  # split: (heads, head size), or (q/k/v, heads, head size)
        shape = tuple(osh[o] for o in oa_use)
        atoms = lay.atoms.reshape(shape)
        for row in atoms.reshape(-1, shape[-1]):  # a head's positions go together
            an.cls.union_all(row)
        an.rectangular.append(atoms)
        return Layout(tuple(oa_use), atoms, lay.cval.reshape(shape), lay.static.reshape(shape))
    an.block(lay.atoms, f"{node_label(node)} regroups the channel axes ({list(ish)} -> {list(osh)}) in a way the "
                        f"analysis does not follow")
    return None


def rectangularize(an: Analyzer, atoms: np.ndarray) -> None:
    """Unite a split block so that its classes depend on one axis only.

    Any selection then removes whole slices along that axis and the kept positions form a
    rectangle (the reshape back and every slice of it stay valid). The axis kept apart is the
    one the classes already vary along most (the head axis, once attention has united q, k
    and v of each head).
    """
    roots = an.cls.roots(atoms)
    if atoms.ndim < 2 or len(np.unique(roots)) == 1:
        return
    best, best_n = 0, -1
    for k in range(atoms.ndim):
        moved = np.moveaxis(roots, k, 0).reshape(atoms.shape[k], -1)
        n = len({frozenset(row.tolist()) for row in moved})
        if n > best_n:
            best, best_n = k, n
    for row in np.moveaxis(atoms, best, 0).reshape(atoms.shape[best], -1):
        an.cls.union_all(row)


def h_reshape(an: Analyzer, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    lay = an.layout(x)
    if lay is None:
        return
    ish, osh = an.shape(x), an.shape(out)
    res = map_reshape(an, node, lay, ish, osh)
    if res is None:
        return
    an.set_layout(out, res)
    if node.op_type == "Reshape":
        e = an.edit(node, "reshape")
        e.info.update(out_axes=res.axes, out_atoms=res.atoms, rank=len(osh))
        an.deferred.append(lambda: _check_target(an, node, lay, res, len(osh)))


def _check_target(an: Analyzer, node: Node, lay: Layout, res: Layout, rank: int) -> None:
    """Every element of the target shape must follow the pruning: a literal on a carried axis is
    rewritten, a -1 adapts, a run-time dim must read an axis that shrinks the same way."""
    elems = sv.pieces(node.inputs[1], an.shapes)
    e = an.edits[node]
    why = None
    if elems is None or len(elems) != rank:
        why = "its target shape cannot be read"
    else:
        allowzero = int(node.attrs.get("allowzero", 0))
        for a, (el, piece) in enumerate(elems):
            carried = a in res.axes
            if isinstance(el, int) and el == -1:
                continue
            if isinstance(el, int) and el == 0 and not allowzero:
                el = sv.Dim(node.inputs[0], a)
            if isinstance(el, int):
                if carried:
                    if piece is None:
                        why = f"its target dim {a} is computed from constants the rewrite cannot reach"
                        break
                    e.info.setdefault("literals", {})[a] = piece
                continue
            if isinstance(el, sv.Dim):
                src = an.layout(el.value)
                src_carried = src is not None and el.axis in src.axes
                if (carried or src_carried) and not (carried and src_carried and
                                                    _signature(an, res, a) == _signature(an, src, el.axis)):
                    why = (f"its target dim {a} is read at run time from dim {el.axis} of {el.value.name!r}, "
                           f"which does not shrink with these channels")
                    break
                continue
            why = f"its target dim {a} is computed at run time in a way the analysis cannot read"
            break
    if why is not None:
        an.block(lay.atoms, f"{node_label(node)}: {why}")


def h_flatten(an: Analyzer, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    lay = an.layout(x)
    res = map_reshape(an, node, lay, an.shape(x), an.shape(out))
    if res is not None:
        an.set_layout(out, res)


def h_transpose(an: Analyzer, node: Node) -> None:
    lay = an.layout(node.inputs[0])
    r = len(an.shape(node.inputs[0]))
    perm = list(node.attrs.get("perm", list(reversed(range(r)))))
    new = [perm.index(a) for a in lay.axes]
    order = sorted(range(len(new)), key=lambda k: new[k])
    an.set_layout(node.outputs[0], Layout(tuple(sorted(new)), np.ascontiguousarray(np.transpose(lay.atoms, order)),
                                          np.transpose(lay.cval, order), np.transpose(lay.static, order)))


def _axes_arg(an: Analyzer, node: Node, rank: int) -> list | None:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = node.inputs[1].constant()
        if arr is None:
            return None
        axes = arr.ravel().tolist()
    return None if axes is None else sorted(int(a) % rank for a in axes)


def h_unsqueeze(an: Analyzer, node: Node) -> None:
    lay = an.layout(node.inputs[0])
    r_out = len(an.shape(node.outputs[0]))
    axes = _axes_arg(an, node, r_out)
    if axes is None:
        an.block(lay.atoms, f"{node_label(node)} has axes known only at run time")
        return
    kept = [j for j in range(r_out) if j not in axes]
    an.set_layout(node.outputs[0], Layout(tuple(kept[a] for a in lay.axes), lay.atoms, lay.cval, lay.static))


def h_squeeze(an: Analyzer, node: Node) -> None:
    lay = an.layout(node.inputs[0])
    ish = an.shape(node.inputs[0])
    axes = _axes_arg(an, node, len(ish))
    if axes is None:
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            an.block(lay.atoms, f"{node_label(node)} has axes known only at run time")
            return
        axes = [a for a, d in enumerate(ish) if d == 1]
    gone = [lay.axes.index(a) for a in axes if a in lay.axes]  # a carried axis of size 1 (q of packed q/k/v)
    atoms, cval, static = (np.squeeze(arr, axis=tuple(gone)) if gone else arr
                           for arr in (lay.atoms, lay.cval, lay.static))
    kept = [a for a in range(len(ish)) if a not in axes]
    an.set_layout(node.outputs[0], Layout(tuple(kept.index(a) for a in lay.axes if a not in axes), atoms, cval,
                                          static))


def h_concat(an: Analyzer, node: Node) -> None:
    out = node.outputs[0]
    r = len(an.shape(out))
    axis = int(node.attrs["axis"]) % r
    lays = [an.layout(v) for v in node.inputs]
    carried_axes = {lay.axes for lay in lays if lay is not None}
    if any(axis in axes for axes in carried_axes):
        if len(carried_axes) != 1 or len(next(iter(carried_axes))) != 1:
            for lay in lays:
                if lay is not None:
                    an.block(lay.atoms, f"{node_label(node)} concatenates channels laid out differently")
            return
        parts, cvals, statics = [], [], []
        for v, lay in zip(node.inputs, lays):
            if lay is not None:
                parts.append(lay.atoms)
                cvals.append(lay.cval)
                statics.append(lay.static)
            else:
                fresh = an.cls.new(an.shape(v)[axis])
                an.block(fresh, f"{node_label(node)} concatenates {v.name!r}, which no prunable layer produces")
                parts.append(fresh)
                cvals.append(np.full(fresh.shape, np.nan))
                statics.append(np.zeros(fresh.shape, dtype=bool))
        an.set_layout(out, Layout((axis,), np.concatenate(parts), np.concatenate(cvals), np.concatenate(statics)))
        return
    operands = [(i, list(range(r))) for i, v in enumerate(node.inputs) if v is not None]
    joint, atoms, cv, statics = join(an, node, operands, [a for a in range(r) if a != axis])
    if atoms is None:
        return
    same = np.all([np.array_equal(c, cv[0], equal_nan=True) for c in cv])
    an.set_layout(out, Layout(tuple(joint), atoms, cv[0] if same else np.full(atoms.shape, np.nan),
                              np.logical_and.reduce(statics)))


def _split_sizes(an: Analyzer, node: Node, dim: int) -> list | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = node.inputs[1].constant()
        return None if arr is None else [int(s) for s in arr.ravel()]
    if "split" in node.attrs:
        return [int(s) for s in node.attrs["split"]]
    n = int(node.attrs.get("num_outputs", len(node.outputs)))
    step = -(-dim // n)
    return [min(step, dim - k * step) for k in range(n)]


def h_split(an: Analyzer, node: Node) -> None:
    x = node.inputs[0]
    lay = an.layout(x)
    r = len(an.shape(x))
    axis = int(node.attrs.get("axis", 0)) % r
    if axis not in lay.axes:
        for o in node.outputs:
            an.set_layout(o, Layout(lay.axes, lay.atoms, lay.cval, lay.static))
        return
    p = lay.axes.index(axis)
    sizes = _split_sizes(an, node, an.shape(x)[axis])
    if sizes is None or sum(sizes) != lay.atoms.shape[p] or len(sizes) != len(node.outputs):
        an.block(lay.atoms, f"{node_label(node)} splits the channels at run-time positions")
        return
    parts, off = [], 0
    for o, s in zip(node.outputs, sizes):
        idx = np.arange(off, off + s)
        part = Layout(lay.axes, np.take(lay.atoms, idx, axis=p), np.take(lay.cval, idx, axis=p),
                      np.take(lay.static, idx, axis=p))
        parts.append(part.atoms)
        an.set_layout(o, part)
        off += s
    e = an.edit(node, "split")
    e.info.update(axis=axis, position=p, parts=parts)


def h_slice(an: Analyzer, node: Node) -> None:
    x = node.inputs[0]
    lay = an.layout(x)
    ish = an.shape(x)
    if an.model.opset >= 10:
        args = [v.constant() if v is not None else None for v in node.inputs[1:5]]
        if any(a is None and i < 2 for i, a in enumerate(args)) or \
                any(v is not None and a is None for v, a in zip(node.inputs[3:5], args[2:4])):
            an.block(lay.atoms, f"{node_label(node)} slices at positions known only at run time")
            return
        starts, ends = args[0].ravel().tolist(), args[1].ravel().tolist()
        axes = args[2].ravel().tolist() if len(args) > 2 and args[2] is not None else list(range(len(starts)))
        steps = args[3].ravel().tolist() if len(args) > 3 and args[3] is not None else [1] * len(starts)
    else:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    atoms, cval, static, cuts = lay.atoms, lay.cval, lay.static, []
    for k, (s, e, a, st) in enumerate(zip(starts, ends, axes, steps)):
        a = int(a) % len(ish)
        if a not in lay.axes:
            continue
        if st != 1:
            an.block(lay.atoms, f"{node_label(node)} slices the channel axis with step {st}")
            return
        n = ish[a]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(s, min(n, e + n if e < 0 else e))
        p = lay.axes.index(a)
        cuts.append((k, a, p, s, e, np.take(atoms, np.arange(n), axis=p)))
        atoms, cval = np.take(atoms, np.arange(s, e), axis=p), np.take(cval, np.arange(s, e), axis=p)
        static = np.take(static, np.arange(s, e), axis=p)
    an.set_layout(node.outputs[0], Layout(lay.axes, atoms, cval, static))
    if cuts:
        an.edit(node, "slice").info["cuts"] = cuts


def h_expand(an: Analyzer, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    sx, so = an.shape(x), an.shape(out)
    elems = sv.elements(node.inputs[1], an.shapes)
    lay = an.layout(x)
    if sx is None or so is None:
        if lay is not None:
            an.block(lay.atoms, f"{node_label(node)} has unknown shapes")
        return
    shift = len(so) - len(sx)

    def expands_to_one(i: int) -> bool:  # target element for input axis i is 1 (keeps the input's size)
        j = i + shift
        return elems is not None and j - (len(so) - len(elems)) >= 0 and \
            elems[j - (len(so) - len(elems))] == 1
    if lay is not None:
        if not all(expands_to_one(a) for a in lay.axes):
            an.block(lay.atoms, f"{node_label(node)} expands to a shape that fixes the channel count")
            return
        an.set_layout(out, Layout(tuple(a + shift for a in lay.axes), lay.atoms, lay.cval, lay.static))
        return
    origin = an.origin_of(node, 0)
    if origin is None or not all(expands_to_one(i) for i in range(len(sx)) if sx[i] > 1):
        return  # without an origin the expanded value is opaque; consumers block on it
    amap = (None,) * shift + tuple(origin.axis_map[i] if sx[i] == so[i + shift] else None for i in range(len(sx)))
    an.origins[out] = Origin(origin.node, origin.input, amap, origin.array)


def h_tile(an: Analyzer, node: Node) -> None:
    lay = an.layout(node.inputs[0])
    reps = node.inputs[1].constant() if node.inputs[1] is not None else None
    if reps is None or any(int(reps.ravel()[a]) != 1 for a in lay.axes):
        an.block(lay.atoms, f"{node_label(node)} repeats along the channel axis")
        return
    an.set_layout(node.outputs[0], Layout(lay.axes, lay.atoms, lay.cval, lay.static))


HANDLERS = {"Reshape": h_reshape, "Flatten": h_flatten, "Transpose": h_transpose, "Unsqueeze": h_unsqueeze,
            "Squeeze": h_squeeze, "Concat": h_concat, "Split": h_split, "Slice": h_slice, "Expand": h_expand,
            "Tile": h_tile}
