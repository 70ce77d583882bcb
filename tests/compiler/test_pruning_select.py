"""Importance criteria and selection: ratios, rounding, whole heads, global ranking, bad requests."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graft import ir
from graft.compiler.techniques.pruning import PruneConfig, PruneError, SelectionError, analyze, prune, select
from graft.compiler.techniques.pruning.importance import CriterionError, scores

HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'
TWO_LAYERS = HEAD + """
g (float[1,3,8,8] x) => (float[1,2,8,8] y) {
  a = Conv (x, w1)
  b = BatchNormalization (a, gamma, beta, mean, var)
  c = Relu (b)
  d = Conv (c, w2)
  e = Relu (d)
  y = Conv (e, w3)
}"""


def build(w1_scale=None, gamma=None, c1=16, c2=32):
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((c1, 3, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((c2, c1, 1, 1)).astype(np.float32)
    if w1_scale is not None:  # the channel is weak where it is made and where it is read
        w1 *= np.asarray(w1_scale, np.float32).reshape(-1, 1, 1, 1)
        w2 *= np.asarray(w1_scale, np.float32).reshape(1, -1, 1, 1)
    arrays = dict(w1=w1, gamma=np.asarray(gamma if gamma is not None else np.ones(c1), np.float32),
                  beta=np.zeros(c1, np.float32), mean=np.zeros(c1, np.float32), var=np.ones(c1, np.float32),
                  w2=w2,
                  w3=rng.standard_normal((2, c2, 1, 1)).astype(np.float32))
    proto = onnx.parser.parse_model(TWO_LAYERS)
    for k, v in arrays.items():
        proto.graph.initializer.append(numpy_helper.from_array(v, k))
    return ir.from_onnx(proto)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_bad_ratio_is_a_clear_error(ratio):
    with pytest.raises(SelectionError, match=r"ratio must be (in \[0, 1\)|a number)"):
        prune(build(), PruneConfig(ratio=ratio))


def test_bad_options_are_clear_errors():
    with pytest.raises(PruneError, match="unknown pruning criterion 'l3'"):
        prune(build(), PruneConfig(criterion="l3"))
    with pytest.raises(PruneError, match="round_to must be a positive integer"):
        prune(build(), PruneConfig(round_to=0))
    with pytest.raises(PruneError, match="taylor criterion needs calibration"):
        prune(build(), PruneConfig(criterion="taylor"))
    with pytest.raises(PruneError, match="unknown group kind"):
        prune(build(), PruneConfig(kinds=("filters",)))
    a = analyze(build())
    with pytest.raises(CriterionError, match="unknown pruning criterion"):
        scores(a, a.groups[0], "l0")


def test_local_ratio_holds_per_group_and_round_to_multiple():
    a = analyze(build())
    chosen = {ch.group.name: ch for ch in select(a, 0.3, criterion="l2")}
    assert len(chosen["a"].remove) == 16 - 11 and len(chosen["d"].remove) == 32 - 22  # round(n * 0.7)
    chosen = {ch.group.name: ch for ch in select(a, 0.3, criterion="l2", round_to=8)}
    assert chosen["a"].kept == 8 and chosen["d"].kept == 24  # 11.2 -> 8, 22.4 -> 24
    assert {ch.group.name for ch in select(a, 0.3)} == {"a", "d"}  # 'y' reaches the graph output


def test_l1_l2_and_bn_scale_pick_the_weakest_channels():
    scale = np.ones(16)
    scale[[3, 7, 11]] = 1e-3
    a = analyze(build(w1_scale=scale))
    for crit in ("l1", "l2"):
        ch = next(c for c in select(a, 3 / 16, criterion=crit) if c.group.name == "a")
        pos = {c: i for i, c in enumerate(ch.group.classes)}
        assert sorted(pos[c] for c in ch.remove) == [3, 7, 11], crit
    gamma = np.linspace(1, 2, 16)
    gamma[[0, 5]] = 0.01
    a = analyze(build(gamma=gamma))
    ch = next(c for c in select(a, 2 / 16, criterion="bn_scale") if c.group.name == "a")
    pos = {c: i for i, c in enumerate(ch.group.classes)}
    assert sorted(pos[c] for c in ch.remove) == [0, 5]
    other = next(c for c in select(a, 0.5, criterion="bn_scale") if c.group.name == "d")
    assert "no BatchNormalization" in other.note and len(other.remove) == 16


def test_global_ratio_ranks_across_groups_and_caps_each_group():
    a = analyze(build())
    chosen = {ch.group.name: ch for ch in select(a, 0.25, scope="global", criterion="l1")}
    assert sum(len(ch.remove) for ch in chosen.values()) == round(0.25 * 48)
    # one ranking over normalized scores: each removed class scores below every kept one
    def normalized(ch):
        return ch.scores / ch.scores.mean()
    removed = [normalized(ch)[ch.group.classes.index(c)] for ch in chosen.values() for c in ch.remove]
    kept = [normalized(ch)[i] for ch in chosen.values() for i, c in enumerate(ch.group.classes)
            if c not in ch.remove]
    assert max(removed) <= min(kept)
    chosen = {ch.group.name: ch for ch in select(a, 0.95, scope="global")}
    assert all(len(ch.remove) <= int(ch.group.size * 0.9) for ch in chosen.values())
    chosen = {ch.group.name: ch for ch in select(a, 0.5, scope="global", round_to=8)}
    assert all(ch.kept % 8 == 0 for ch in chosen.values())


def test_group_never_becomes_empty():
    a = analyze(build(c1=2))
    ch = next(c for c in select(a, 0.9) if c.group.name == "a")
    assert ch.kept == 1 and "would empty the group" in ch.note


def test_zero_only_removes_exactly_removable_channels():
    scale = np.ones(16)
    scale[[2, 9]] = 0.0
    gamma = np.ones(16)
    gamma[[2, 9]] = 0.0  # BN keeps them at beta - mean * s = 0: exactly zero channels
    a = analyze(build(w1_scale=scale, gamma=gamma))
    g = a.group("a")
    assert [i for i, c in enumerate(g.classes) if g.exact[c]] == [2, 9]
    ch = next(c for c in select(a, 0.0, zero_only=True) if c.group.name == "a")
    assert sorted(g.classes.index(c) for c in ch.remove) == [2, 9]
