"""Checks on a ``torch.export`` archive (``.pt2``) before ``torch.export.load`` reads it.

``torch.export.load`` (torch 2.13) is not safe on a file from elsewhere: it unpickles weights,
constants and example inputs marked ``use_pickle`` or refused by the weights-only unpickler with
``torch.load(weights_only=False)``, loads compiled AOTInductor libraries, evaluates symbolic-shape
strings with ``sympy.sympify`` (Python ``eval``), resolves node targets by walking attributes of
``torch`` (``torch.os.system`` resolves), and writes names from the file into the code fx generates.
:func:`check_pt2` refuses all of these from the archive's bytes, before torch reads any of it:

- members: only what ``torch.export.save`` writes for one ExportedProgram named ``model``
  (:data:`PT2_FILES`): no AOTInductor, ExecuTorch or legacy pickled members;
- weights and constants: raw tensors only (``use_pickle`` false, ``weight_N``/``tensor_N`` files),
  no custom or opaque objects;
- example inputs: none, or a pickle ``torch.load(weights_only=True)`` accepts;
- graph: every node target an ATen op (not one that touches files) or an ``operator`` function, no
  subgraph arguments; every symbolic expression sympy symbols, numbers and arithmetic
  (:func:`check_sym_expr`); every other string outside free-text metadata (stack traces, module
  paths) a (dotted) identifier, and free text free of control characters (``\\r`` ends a Python
  comment).
"""
from __future__ import annotations

import io
import json
import re
import tokenize
import zipfile

import torch

from graft.ir.torch_artifact_fx import OPERATORS, ArtifactError, check_name, first_line, is_dotted_name, resolve_target


PT2_FILES = [re.compile(p) for p in (
    r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id",
    r"models/model\.json", r"data/weights/model_weights_config\.json", r"data/weights/weight_[0-9]+",
    r"data/constants/model_constants_config\.json", r"data/constants/tensor_[0-9]+",
    r"data/sample_inputs/model\.pt", r"extra/[A-Za-z0-9_.\-]+")]
# strings under these keys are free text torch only stores (stack traces, module paths); names elsewhere
# reach fx's generated code and must be identifiers
_FREE_TEXT = frozenset({"stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom", "in_spec",
                        "out_spec", "torch_version", "as_string", "as_strings", "debug_handle", "from_node",
                        "type"})
_OPERATOR_TARGETS = frozenset(f"_operator.{n}" for n in OPERATORS)
_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "True", "False", "positive", "negative", "nonnegative", "integer",
    "real", "finite", "oo", "zoo", "nan", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or",
    "Not", "Mul", "Add", "Pow", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv",
    "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity", "int_oo"})
_SYMBOL = re.compile(r"[a-z]+[0-9]+\Z")
_SYM_OPS = frozenset({"+", "-", "*", "/", "//", "%", "**", "(", ")", ",", "=", "<", ">", "<=", ">=", "==", "!=",
                      "&", "|", "~"})


def check_sym_expr(expr: str, where: str) -> None:
    """Refuse a symbolic-shape expression that is more than sympy symbols, integers and arithmetic.

    torch's deserializer passes these strings to ``sympy.sympify``, which evaluates them as Python.
    Allowed tokens: the names in ``_SYMPY_NAMES``, symbol names (``s0``, ``u3``), quoted symbol
    names, numbers of at most 30 characters, and arithmetic/comparison operators.

    Raises:
        ArtifactError: any other token, naming it.
    """
    if not isinstance(expr, str) or len(expr) > 10_000:
        raise ArtifactError(f"{where}: symbolic expression is not a string of at most 10000 characters")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError) as e:
        raise ArtifactError(f"{where}: symbolic expression {expr[:80]!r} does not parse ({e})") from None
    for tok in tokens:
        kind, s = tok.type, tok.string
        ok = (kind in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER) or
              (kind == tokenize.NAME and (s in _SYMPY_NAMES or _SYMBOL.match(s))) or
              (kind == tokenize.NUMBER and len(s) <= 30 and re.fullmatch(r"[0-9.eE+\-]+", s)) or
              (kind == tokenize.STRING and re.fullmatch(r"'[a-z]+[0-9]+'", s)) or
              (kind == tokenize.OP and s in _SYM_OPS))
        if not ok:
            raise ArtifactError(f"{where}: symbolic expression {expr[:80]!r} holds {s!r}, which is not a sympy "
                                f"symbol, number or operator; refusing to evaluate it")


def _check_target(target, where: str) -> None:
    if not isinstance(target, str):
        raise ArtifactError(f"{where}: node target {target!r} is not a string")
    if target in _OPERATOR_TARGETS:
        return
    m = re.fullmatch(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)", target)
    if m:
        try:
            resolve_target(f"aten::{m[1]}.{m[2]}")
            return
        except ArtifactError:
            pass
    raise ArtifactError(f"{where}: node target {target!r} is not an ATen op or operator function graft allows; "
                        f"nothing from the file was run")


def _walk_pt2_json(o, key: str, where: str) -> None:
    if isinstance(o, dict):
        if "as_graph" in o:
            raise ArtifactError(f"{where}: a node argument holds a subgraph (higher-order op); graft's loader "
                                f"does not accept those")
        for k, v in o.items():
            if not isinstance(k, str) or not (k == "" or re.fullmatch(r"[A-Za-z0-9_.]+", k)):
                raise ArtifactError(f"{where}: JSON key {k!r} is not an identifier")
            if k == "target" and key == "nodes":
                _check_target(v, where)
                continue
            if k == "expr_str":
                check_sym_expr(v, where)
                continue
            if k == "range_constraints" and isinstance(v, dict):
                for sym in v:
                    if not _SYMBOL.match(sym):
                        raise ArtifactError(f"{where}: range constraint on {sym!r}, which is not a symbol name")
            if k in _FREE_TEXT:
                _check_free_text(v, k, where)
                continue
            _walk_pt2_json(v, k, where)
    elif isinstance(o, list):
        for v in o:
            _walk_pt2_json(v, key, where)
    elif isinstance(o, str) and o != "":
        if not is_dotted_name(o):
            raise ArtifactError(f"{where}: field {key!r} holds {o[:80]!r}, which is not a (dotted) identifier")


# a line break Python's tokenizer honours (\r) or other control characters: free text must not end a comment
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")


def _check_free_text(o, key: str, where: str) -> None:
    if isinstance(o, str):
        if _CONTROL.search(o):
            raise ArtifactError(f"{where}: field {key!r} holds control characters")
    elif isinstance(o, dict):
        for v in o.values():
            _check_free_text(v, key, where)
    elif isinstance(o, list):
        for v in o:
            _check_free_text(v, key, where)


def check_pt2(z: zipfile.ZipFile, where: str) -> str:
    """Check a ``torch.export`` archive before ``torch.export.load`` reads it (see the module doc).

    Returns:
        the archive's root folder name.

    Raises:
        ArtifactError: the first member, weight entry, node target, name or expression refused.
    """
    names = z.namelist()
    if len(set(names)) != len(names):
        raise ArtifactError(f"{where}: the archive holds a member name twice")
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1:
        raise ArtifactError(f"{where}: archive members lie under {len(roots)} root folders, not one")
    root = roots.pop()
    for n in names:
        if n.endswith("/"):  # a folder entry holds nothing
            continue
        if not any(p.fullmatch(n[len(root) + 1:]) for p in PT2_FILES):
            raise ArtifactError(f"{where}: archive member {n!r} is not one torch.export.save writes for an "
                                f"ExportedProgram (compiled code, pickles and other models are refused)")
    for required in ("archive_format", "archive_version", "models/model.json"):
        if f"{root}/{required}" not in names:
            raise ArtifactError(f"{where}: archive member {root}/{required} is missing")
    if z.read(f"{root}/archive_format").strip() != b"pt2":
        raise ArtifactError(f"{where}: archive_format is not 'pt2'")
    for kind, prefix in (("weights", "weight_"), ("constants", "tensor_")):
        member = f"{root}/data/{kind}/model_{kind}_config.json"
        if member not in names:
            raise ArtifactError(f"{where}: {member} is missing")
        try:
            config = json.loads(z.read(member)).get("config")
        except (ValueError, AttributeError):
            config = None
        if not isinstance(config, dict):
            raise ArtifactError(f"{where}: {member} is not a weights table")
        for fqn, entry in config.items():
            check_name(fqn, f"{kind} name", f"{where}: {member}")
            if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
                raise ArtifactError(f"{where}: {kind} entry {fqn!r} is pickled; graft loads raw tensors only")
            path = entry.get("path_name")
            if not isinstance(path, str) or not re.fullmatch(prefix + r"[0-9]+", path):
                raise ArtifactError(f"{where}: {kind} entry {fqn!r} points at {path!r}, not a raw tensor file")
            if f"{root}/data/{kind}/{path}" not in names:
                raise ArtifactError(f"{where}: {kind} entry {fqn!r} points at missing member {path!r}")
    sample = f"{root}/data/sample_inputs/model.pt"
    if sample in names and z.read(sample):
        try:
            torch.load(io.BytesIO(z.read(sample)), weights_only=True)
        except Exception as e:  # noqa: BLE001 — any refusal of torch's restricted unpickler
            raise ArtifactError(f"{where}: the archive's example inputs are a pickle torch's weights-only loader "
                                f"refuses ({first_line(e)}); torch.export.load would unpickle them "
                                f"unrestricted") from None
    member = f"{root}/models/model.json"
    try:
        program = json.loads(z.read(member))
    except ValueError as e:
        raise ArtifactError(f"{where}: {member} is not valid JSON ({e})") from None
    _walk_pt2_json(program, "", f"{where}: {member}")
    return root


