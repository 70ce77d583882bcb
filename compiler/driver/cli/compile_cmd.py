"""``graft compile IN -o OUT``: run a pipeline (and user rules), verify, write atomically, report."""
from __future__ import annotations

from pathlib import Path

import click

from graft.compiler.driver.cli._errors import fail, parse_dims
from graft.compiler.driver.cli._preflight import check_dims, check_output_path


def _input_path(arg: str) -> Path:
    from graft.ir import zoo

    path = Path(arg)
    if path.exists() or arg not in zoo.NAMES:
        if not path.exists():
            fail(f"{arg}: no such file (give an .onnx path or a zoo model: {', '.join(zoo.NAMES)})")
        return path
    try:
        return zoo.resolve(arg)
    except zoo.ZooError as e:
        fail(f"{arg}: {e}")


def _prune_config(ratio, criterion, round_to, zero_only, scope, calibration):
    """The --prune* options as a PruneConfig (None without --prune / --prune-zero-only); bad values fail here."""
    if ratio is None and not zero_only:
        return None
    from graft.compiler.techniques.pruning import PruneConfig, PruneError, SelectionError

    if zero_only and ratio:
        fail(f"--prune {ratio} --prune-zero-only: --prune-zero-only removes only exactly removable channels and "
             f"takes no ratio; give one of the two")
    if criterion == "taylor" and not calibration and not zero_only:
        fail("--prune-criterion taylor needs calibration inputs: --prune-calibration FILE.npz or a directory of .npy")
    config = PruneConfig(ratio=0.0 if ratio is None else ratio, criterion=criterion, scope=scope, round_to=round_to,
                         zero_only=zero_only, calibration=calibration)
    try:
        return config.validate()
    except (PruneError, SelectionError) as e:
        fail(f"--prune {ratio}: {e}")


def _prune_errors() -> tuple:
    from graft.compiler.techniques.pruning import AnalysisError, PruneError, SelectionError
    from graft.rules.prune_plan import PlanError
    from graft.compiler.techniques.pruning.shapes import ShapeError

    return PruneError, SelectionError, PlanError, AnalysisError, ShapeError


def _calibration_data_error() -> type:
    # CalibrationDataError only: the data is read by --prune-criterion taylor and --quantize alike
    from graft.compiler.techniques.calibration import CalibrationDataError

    return CalibrationDataError


def _precision_error() -> type:
    from graft.rules.precision import PrecisionError

    return PrecisionError


def _quantize_errors() -> tuple:
    # imported only when an error reaches this clause: a compile without --quantize skips the import
    from graft.compiler.techniques.calibration import CalibrationDataError, CalibrationRunError
    from graft.compiler.techniques.quantization import QuantizationError

    return QuantizationError, CalibrationDataError, CalibrationRunError


@click.command("compile")
@click.argument("model", metavar="IN", required=False)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the result: ONNX, or with --target torch a .pt2 file (data only; see README "
                   "'Torch in and out').")
@click.option("--torch", "torch_spec", metavar="PKG.MODULE:FACTORY",
              help="Compile a torch model: FACTORY() returns a module or (module, example_inputs); replaces IN.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="SHAPE",
              help="Example input of the --torch model, e.g. 1x3x224x224 or 2x16:int64 (one per input, in order).")
@click.option("--target", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
              help="Output: an ONNX model, or a trainable torch module: a torch.export program when torch.export "
                   "captures it (torch.export.load(OUT).module()), else graft's graft-fx format (load either with "
                   "graft.ir.torch_backend.load_module).")
@click.option("--pipeline", default="optimize", show_default=True,
              help="Named pipeline (see `graft rules`); 'none' runs only --rules.")
@click.option("--rules", "rule_files", multiple=True, metavar="FILE",
              help="Python file of graft.compiler.Rule objects (or a RULES list), run after the pipeline (repeatable).")
@click.option("--no-verify", is_flag=True,
              help="Skip the numeric comparison with the input model (structural checks still run: "
                   "ir.verify and onnx.checker, without full_check's strict shape inference).")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest absolute output difference accepted (float16/bfloat16 outputs: at least 8 "
                   "roundoffs at the output's magnitude).")
@click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE",
              help="Size of a named symbolic input dim for verification (repeatable).")
@click.option("--prune", "prune_ratio", type=float, metavar="RATIO",
              help="Structured pruning before the pipeline: remove this fraction, in [0, 1), of the channels, "
                   "heads and neurons of every coupled group.")
@click.option("--prune-criterion", type=click.Choice(["l1", "l2", "bn_scale", "taylor"]), default="l2",
              show_default=True, help="Channel importance for --prune (taylor needs --prune-calibration).")
@click.option("--prune-round", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Keep pruned channel counts a multiple of N (heads are kept whole, never rounded).")
@click.option("--prune-zero-only", is_flag=True,
              help="Remove only channels whose removal leaves the outputs unchanged (all-zero or constant).")
@click.option("--prune-scope", type=click.Choice(["local", "global"]), default="local", show_default=True,
              help="local: RATIO per group; global: RATIO of all channels, ranked across groups.")
@click.option("--prune-calibration", type=click.Path(exists=True), metavar="PATH",
              help="Calibration inputs for --prune-criterion taylor (.npz file or directory of .npy files).")
@click.option("--quantize", "quantize_mode", default="none", show_default=True,
              type=click.Choice(["auto", "static", "static-per-tensor", "static-per-channel", "dynamic",
                                 "weight-only-int8", "weight-only-int4", "none"]),
              help="Int8 quantization after the pipeline; auto times the candidate formats and keeps the fastest "
                   "within the accuracy budget.")
@click.option("--weight-format", type=click.Choice(["dq", "matmulnbits"]), default="dq", show_default=True,
              help="--quantize weight-only-*: standard ONNX DequantizeLinear(block_size) -> MatMul (onnxruntime fuses "
                   "it into MatMulNBits), or onnxruntime's com.microsoft.MatMulNBits directly.")
@click.option("--block-size", type=int, default=32, show_default=True, metavar="N",
              help="--quantize weight-only-*: weights per scale along K, a power of two from 16 to 256.")
@click.option("--asymmetric", is_flag=True, help="--quantize weight-only-*: per-block zero points (default: symmetric).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=0, show_default=True,
              help="--weight-format matmulnbits: MatMulNBits compute precision (0 unset = float32 on CPU, 4 = int8 "
                   "activations, faster).")
@click.option("--calibration", type=click.Path(exists=True), metavar="PATH",
              help="Calibration data for --quantize and --precision: an .npz file or a directory of .npy files.")
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="minmax",
              show_default=True, help="How calibrated ranges are chosen.")
@click.option("--exclude", "exclude", multiple=True, metavar="NODE|OP|GLOB",
              help="Keep in float: a node name, an op type, or a name glob (repeatable).")
@click.option("--upgrade-opset", is_flag=True,
              help="Convert the model to the opset the quantization format needs instead of failing.")
@click.option("--fold-initializer-inputs", is_flag=True,
              help="Treat initializers that are also graph inputs as constants, so they fold (always done for "
                   "IR version < 4 models, which list every initializer as an input); OUT no longer takes them "
                   "as inputs.")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "none"]), default="none", show_default=True,
              help="Run float32 nodes in float16/bfloat16 where the op's schema allows it and the ranges measured on "
                   "--calibration (else generated inputs) fit; the summary lists the nodes kept in float32 and why.")
@click.option("--keep-io-types/--no-keep-io-types", default=True, show_default=True,
              help="With --precision: graph inputs and outputs stay float32.")
@click.option("-q", "--quiet", is_flag=True, help="No summary, only errors.")
def compile_cmd(model: str | None, output: str, torch_spec: str | None, input_shapes: tuple[str, ...], target: str,
                pipeline: str, rule_files: tuple[str, ...], no_verify: bool, atol: float, dims: tuple[str, ...],
                quiet: bool, prune_ratio: float | None = None, prune_criterion: str = "l2", prune_round: int = 1,
                prune_zero_only: bool = False, prune_scope: str = "local",
                prune_calibration: str | None = None, quantize_mode: str = "none", calibration: str | None = None,
                calib_method: str = "minmax", exclude: tuple[str, ...] = (), upgrade_opset: bool = False,
                fold_initializer_inputs: bool = False, precision: str = "none", keep_io_types: bool = True,
                weight_format: str = "dq", block_size: int = 32, asymmetric: bool = False,
                accuracy_level: int = 0) -> None:
    """Compile IN (an .onnx file or a zoo name: ppocr-cls, ppocr-det, ppocr-rec, minilm) into OUT.

    Loads IN (onnx.checker), runs the pipeline and any --rules, checks the result
    (ir.verify, onnx.checker; full_check unless --no-verify) and, unless --no-verify, compares its
    outputs with IN's in onnxruntime on generated inputs. OUT is written
    atomically, and only if every step succeeded; OUT may not be any file the command reads (IN,
    its data files, --rules, --calibration, the --torch module). Exit status 1 on any error,
    with one line on stderr (GRAFT_DEBUG=1 adds the traceback); ended by SIGTERM or SIGHUP while
    writing, 128 + the signal number, with no temporary file left.
    """
    from graft.compiler.driver.api import CompileError, InvalidOutputError, NumericMismatchError, compile
    from graft.rules.pipelines import get_pipeline
    from graft.compiler.engine.rewriter import RuleError
    from graft.compiler.engine.rule import RuleDefinitionError
    from graft.compiler.driver.user_rules import UserRuleFileError, load_rule_files, user_frame
    from graft.ir import IRError, ModelLoadError

    dim_sizes = parse_dims(dims)
    out = Path(output)
    example_inputs = None
    reads = [("--rules", p) for p in rule_files] + \
        [(opt, p) for opt, p in (("--calibration", calibration), ("--prune-calibration", prune_calibration)) if p]
    if torch_spec:
        if model:
            fail(f"give either IN ({model}) or --torch {torch_spec}, not both")
        from graft.compiler.driver.cli._torch_input import factory_files, load_factory, torch_model

        factory = load_factory(torch_spec)
        check_output_path(output, None, reads + [("--torch module", f) for f in factory_files(torch_spec)])
        model, example_inputs = torch_model(torch_spec, input_shapes, factory)
        label = torch_spec
    else:
        if not model:
            fail("missing IN: give an .onnx file, a zoo name, or --torch package.module:factory")
        if input_shapes:
            fail("--input-shape is for --torch models (an ONNX model's inputs are typed; use --dim NAME=SIZE)")
        src = _input_path(model)
        label = model
        check_output_path(output, src, reads)
        check_dims(src, dim_sizes)
    suffix = out.suffix.lower()
    if (target == "onnx" and suffix in (".pt", ".pth", ".pt2")) or (target == "torch" and suffix == ".onnx"):
        what = "an ONNX model" if target == "onnx" else "a torch module (.pt2)"
        fix = "add --target torch, or name it .onnx" if target == "onnx" else "drop --target torch, or name it .pt2"
        fail(f"-o {output}: --target {target} writes {what}, not what the name {suffix} says ({fix})")
    try:
        get_pipeline(pipeline)
    except KeyError as e:
        fail(f"--pipeline {pipeline}: {e.args[0]} (`graft rules` lists them)")
    try:
        user_rules = load_rule_files(rule_files)
    except UserRuleFileError as e:
        fail(f"{e} (fix the rule file)")
    torch_errors = ()
    if torch_spec:
        from graft.ir.torch_frontend import TorchCaptureError, TorchImportError

        torch_errors = (TorchCaptureError, TorchImportError)
    prune = _prune_config(prune_ratio, prune_criterion, prune_round, prune_zero_only, prune_scope,
                          prune_calibration)
    if quantize_mode in ("static", "static-per-tensor", "static-per-channel") and not calibration:
        fail(f"--quantize {quantize_mode} needs calibration data: --calibration FILE.npz or a directory of .npy "
             f"(or use --quantize dynamic, which needs none)")
    nbits_opts = {"weight_format": weight_format, "block_size": block_size, "symmetric": not asymmetric,
                  "accuracy_level": accuracy_level}
    if not quantize_mode.startswith("weight-only") and \
            (weight_format, block_size, asymmetric, accuracy_level) != ("dq", 32, False, 0):
        fail("--weight-format, --block-size, --asymmetric and --accuracy-level apply to --quantize weight-only-int4 "
             "and weight-only-int8 only")
    if accuracy_level and weight_format != "matmulnbits":
        fail("--accuracy-level applies to --weight-format matmulnbits (the dq form's precision is onnxruntime's "
             "session.qdq_matmulnbits_accuracy_level)")
    if not keep_io_types and precision == "none":
        fail("--no-keep-io-types applies to --precision fp16|bf16 only (give --precision, or drop the flag)")
    if _is_console_script():
        # compile() pauses the cyclic collector (ir/_gc.py); re-enabling it would make its first
        # collection walk every object of both models (~45 ms at 10k nodes) just before the
        # process ends at os._exit: leave it off
        import gc

        gc.disable()
    try:
        result = compile(model, example_inputs, pipeline=pipeline, target=target, rules=user_rules or None,
                         verify=not no_verify, atol=atol, dim_sizes=dim_sizes, prune=prune,
                         quantize=quantize_mode, calibration=calibration, calib_method=calib_method,
                         exclude=list(exclude) or None,
                         quantize_options={"upgrade_opset": upgrade_opset, "progress": not quiet,
                                           **(nbits_opts if quantize_mode.startswith("weight-only") else {})},
                         fold_initializer_inputs=True if fold_initializer_inputs else None,
                         precision=precision, precision_options={"keep_io_types": keep_io_types})
    except torch_errors as e:
        fail(f"--torch {torch_spec}: {e}")
    except ModelLoadError as e:
        msg = str(e).rstrip()
        fail(msg if msg.endswith(")") else f"{msg} (give a complete, valid ONNX model)")
    except RuleDefinitionError as e:
        fail(f"{e} (rename or drop one of the rules)")
    except RuleError as e:
        fail(f"{label}: {e}; no output written (fix the rule, or leave it out)")
    except NumericMismatchError as e:
        if not quiet and e.result is not None:
            from graft.compiler.driver.report import render

            render(e.result)
        fail(f"{label}: {e} (no output written; fix the rule, or pass --no-verify to write it anyway)")
    except InvalidOutputError as e:
        fail(f"{label}: {e}")
    except _calibration_data_error() as e:  # the message starts with the data file or folder
        used_by = "--prune" if prune_calibration and str(e).startswith(str(prune_calibration)) else \
            (f"--quantize {quantize_mode}" if quantize_mode != "none" else f"--precision {precision}")
        fail(f"{label}: {used_by}: {e}")
    except _prune_errors() as e:
        fail(f"{label}: --prune: {e}")
    except _quantize_errors() as e:
        fail(f"{label}: --quantize {quantize_mode}: {e}")
    except _precision_error() as e:
        fail(f"{label}: --precision {precision}: {e}")
    except (CompileError, IRError) as e:
        fail(f"{label}: {e}")
    except SystemExit as e:  # sys.exit() in a rule's code: not a successful compile
        where = user_frame(e)
        fail(f"{label}: {where or 'a rule'} called sys.exit({e.code!r}) during the compile; no output written "
             f"(rules must not exit)")
    except Exception as e:  # noqa: BLE001 — a graft bug: still one line, the traceback on request
        where = user_frame(e)
        if where is not None:  # e.g. a Const/attribute predicate that raised while the matcher ran it
            fail(f"{label}: rule code at {where} raised {type(e).__name__}: {e}; no output written (fix the rule, "
                 f"or leave it out)")
        fail(f"{label}: internal error {type(e).__name__}: {e} (rerun with GRAFT_DEBUG=1 for the traceback "
             f"and report it)")
    from graft.ir.onnx_io import exit_on_signals

    try:
        with exit_on_signals():  # SIGTERM/SIGHUP mid-write: exit 128+signum, no temporary file left
            result._save_as_checked(out)  # the bytes onnx.checker checked: no second serialization
    except OSError as e:
        fail(f"{output}: cannot write ({e.strerror or e}); check the directory exists and is writable")
    except ValueError as e:  # graft.ir.torch_artifact.ArtifactError: a module neither torch file format holds
        fail(f"{output}: {e}; nothing written (compile to ONNX instead)")
    try:
        if not quiet:
            from graft.compiler.driver.report import render

            render(result)
            if result.quantization is not None:
                click.echo(result.quantization.summary())
            if result.precision is not None:
                click.echo(result.precision.summary())
            click.echo(f"wrote {output}")
        else:
            from graft.compiler.driver.report import warnings

            for w in warnings(result):
                click.echo(f"graft: warning: {w}", err=True)
    except BrokenPipeError:  # `graft compile ... | head`: the reader left. Exit 1 quietly, as rich and
        _silence_stdout()     # click do on a broken pipe; the output file is already written
        raise SystemExit(1) from None
    except OSError as e:  # e.g. stdout on a full disk
        _silence_stdout()
        fail(f"wrote {output}, but could not print the summary ({e.strerror or e})")
    _exit_now_if_console_script()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of a dead stream raises nothing."""
    import os
    import sys

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (CliRunner): nothing to flush
        pass


def _exit_now_if_console_script() -> None:
    """End the ``graft`` process here, skipping the teardown of the compiled model.

    Returning would free the input and output models object by object (IR, protos,
    onnxruntime sessions: ~0.1 s CPU at 10k nodes) just before the process ends anyway.
    Only on success, and only when this process is the ``graft`` console script itself
    (its ``__main__`` holds this CLI's ``main``) writing to the real stdout: under
    click's CliRunner, the Python API or another host program, the call returns normally.
    atexit handlers still run and both streams are flushed, so nothing written is lost.
    """
    import os
    import sys

    if not _is_console_script():
        return
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: the normal exit would fail the same way
        return
    os._exit(0)


def _is_console_script() -> bool:
    """True when this process is the ``graft`` console script (its ``__main__`` holds this CLI's
    ``main``) writing to the real standard streams: not CliRunner, the Python API or a host program."""
    import os
    import sys

    entry = sys.modules.get("__main__")
    ctx = click.get_current_context(silent=True)
    group = ctx.find_root().command if ctx is not None else None  # the CLI's `main` when run through it
    # the generated script is a file named graft that imports main; `python -c "...main()"` and
    # programs that call main() themselves expect it to return (or raise SystemExit)
    if group is None or getattr(entry, "main", None) is not group or \
            os.path.basename(getattr(entry, "__file__", None) or "").removesuffix(".exe") != "graft":
        return False
    # a closed stream (`graft ... >&-`) is None in both places: return normally then
    return sys.stdout is not None and sys.stderr is not None and \
        sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__
