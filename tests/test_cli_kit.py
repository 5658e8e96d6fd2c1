"""The CLI kit (pipeline/cli.py) every ``python -m pipeline.*`` shares: argument types, the one-line parser errors,
and run_main's mapping of what ends a run to one ``error:`` line and an exit status."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from pipeline import cli
from pipeline.errors import ConversionError, DataError, PipelineError, Terminated, UsageError


# --------------------------------------------------------------------------- argument types

@pytest.mark.parametrize("text, want", [("0.5", (0.5,)), ("0.1,0.2,0.3", (0.1, 0.2, 0.3)), ("-1,2e-3", (-1.0, 0.002))])
def test_floats_accepts(text, want):
    assert cli.floats(text) == want


@pytest.mark.parametrize("text", ["", "a", "0.5,", "1,,2", "nan", "0.5,inf", "-inf"])
def test_floats_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.floats(text)


@pytest.mark.parametrize("text, want", [("1,28,28", (1, 28, 28)), ("3,224,224", (3, 224, 224))])
def test_shape_accepts(text, want):
    assert cli.shape(text) == want


@pytest.mark.parametrize("text", ["", "28,28", "1,28,28,1", "0,28,28", "1,-28,28", "1,2.5,3", "a,b,c"])
def test_shape_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="C,H,W"):
        cli.shape(text)


@pytest.mark.parametrize("text, want", [("1.5", 1.5), ("-100", -100.0), ("0", 0.0), ("1e-3", 0.001)])
def test_finite_float_accepts(text, want):
    assert cli.finite_float(text) == want


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "", "x", "1,2"])
def test_finite_float_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.finite_float(text)


@pytest.mark.parametrize("text, want", [("0", 0), ("42", 42), (str(2 ** 32 - 1), 2 ** 32 - 1)])
def test_seed_int_accepts(text, want):
    assert cli.seed_int(text) == want


@pytest.mark.parametrize("text", ["-1", str(2 ** 32), "1.5", "x", ""])
def test_seed_int_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.seed_int(text)


@pytest.mark.parametrize("text, want", [("3", (3,)), ("5,1,3", (1, 3, 5)), ("1,2,3,4,5", (1, 2, 3, 4, 5))])
def test_severities_accepts_sorted(text, want):
    assert cli.severities(text) == want


@pytest.mark.parametrize("text", ["", "0", "6", "1,1", "1,x", "1.5", "-1"])
def test_severities_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.severities(text)


def test_class_names_type():
    assert cli.class_names(" cat, dog ,bird") == ("cat", "dog", "bird")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.class_names("cat,cat")


def test_old_names_stay_importable():
    from pipeline import evaluate
    assert evaluate.finite_float is cli.finite_float and evaluate.seed_int is cli.seed_int
    assert evaluate.class_names_arg is cli.class_names


def test_no_cli_copies_its_own_parser_or_types():
    """One kit: no pipeline module defines its own parser class or argument types, and study does not reach into
    export's privates."""
    import inspect

    from pipeline import evaluate, export, study, train, zoo_table
    for mod in (export, evaluate, study, train, zoo_table):
        src = inspect.getsource(mod)
        for needle in ("class _Parser", "def _floats", "def _shape", "def finite_float", "def seed_int",
                       "def _severities", "class _Defaults", "from .export import _"):
            assert needle not in src, f"{mod.__name__} still has {needle!r}"


# --------------------------------------------------------------------------- parser

@pytest.mark.parametrize("module", ["export", "evaluate", "study", "train", "zoo_table"])
def test_every_parser_errors_in_one_line_naming_its_own_help(module):
    import importlib
    p = importlib.import_module(f"pipeline.{module}").build_parser()
    assert isinstance(p, cli.Parser)
    with pytest.raises(UsageError) as e:
        p.parse_args(["--no-such-flag"])
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(f"; see python -m pipeline.{module} --help"), msg


def test_a_subcommand_error_names_the_subcommand_help():
    from pipeline import study
    with pytest.raises(UsageError) as e:
        study.build_parser().parse_args(["precision", "--seed", "x"])
    assert str(e.value).endswith("; see python -m pipeline.study precision --help")
    assert "is not an integer seed" in str(e.value)


# --------------------------------------------------------------------------- run_main

def _raises(exc):
    def run():
        raise exc
    return run


@pytest.mark.parametrize("exc, status, line", [
    (UsageError("bad flag;\n  fix it"), 2, "error: bad flag; fix it"),
    (DataError("no data"), 2, "error: no data"),
    (ConversionError("cannot convert"), 1, "error: cannot convert"),
    (KeyboardInterrupt(), 130, "error: interrupted; nothing changed"),
    (Terminated(), 143, "error: terminated (SIGTERM); nothing changed"),
])
def test_run_main_maps_what_ends_a_run(exc, status, line, capsys):
    then_called = []
    got = cli.run_main(_raises(exc), interrupted_note="; nothing changed", then=then_called.append)
    out, err = capsys.readouterr()
    assert got == status and out == "" and not then_called
    assert err.splitlines() == [line]


def test_run_main_without_note_and_a_plain_pipeline_error(capsys):
    assert cli.run_main(_raises(KeyboardInterrupt())) == 130
    assert cli.run_main(_raises(PipelineError("x"))) == 2
    assert capsys.readouterr().err.splitlines() == ["error: interrupted", "error: x"]


def test_a_ctrl_c_that_comes_late_still_exits_130():
    """After the one line, the process shuts down (its exit handlers, its children reaped); a Ctrl-C still on its
    way or pressed again then used to end it by SIGINT's default action (status -2, seen about one run in ten
    when the signal reached the export while its conversion worker started) instead of 130."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import os, signal, sys\nfrom pipeline import cli\n"
            "def work():\n    raise KeyboardInterrupt\n"
            "status = cli.run_main(work)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.exit(status)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (130, "error: interrupted\n")


def test_exit_program_keeps_what_a_normal_exit_does(tmp_path):
    """exit_program skips the interpreter's teardown, not what SystemExit's shutdown guarantees: a non-daemon thread
    still working is joined, atexit handlers run, multiprocessing reaps a child, and output buffered by Python and
    by a C library (printf into a pipe) reaches the reader; the status is the one given."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import atexit, ctypes, multiprocessing, pathlib, sys, threading, time\n"
            "from pipeline import cli\n"
            "out = pathlib.Path(sys.argv[1])\n"
            "def late():\n    time.sleep(0.5)\n    (out / 'thread').write_text('done')\n"
            "if __name__ == '__main__':\n"
            "    threading.Thread(target=late).start()\n"
            "    atexit.register(lambda: (out / 'atexit').write_text('ran'))\n"
            "    child = multiprocessing.get_context('spawn').Process(target=time.sleep, args=(0.3,))\n"
            "    child.start()\n"
            "    sys.stdout.write('python-buffered')\n"
            "    ctypes.CDLL(None).printf(b' c-buffered')\n"
            "    cli.exit_program(3)\n")
    script = tmp_path / "prog.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                               "PYTHONUNBUFFERED": ""})
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "python-buffered c-buffered"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


@pytest.fixture(autouse=True)
def _sigint_handler_restored():
    """run_main ignores SIGINT once it has mapped a Ctrl-C (the process is about to exit): not pytest's."""
    import signal
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


def test_run_main_returns_the_work_status_or_then(capsys):
    assert cli.run_main(lambda: 1) == 1
    assert cli.run_main(lambda: ("a", 3), then=lambda r: r[1]) == 3
    assert capsys.readouterr().err == ""


def test_run_main_installs_the_sigterm_handler():
    import os
    import signal
    before = signal.getsignal(signal.SIGTERM)
    try:
        def run():
            os.kill(os.getpid(), signal.SIGTERM)
            return 0
        assert cli.run_main(run, interrupted_note="; x") == 143
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("module, note", [
    ("export", "; nothing was written to the output folder"),
    ("evaluate", "; report.json and report.html were not changed"),
    ("study", "; cells already done are kept in OUT/cells: run the same command with --resume to continue"),
    ("train", ""), ("zoo_table", ""),
])
def test_every_main_maps_ctrl_c_with_its_own_note(module, note, monkeypatch, capsys):
    import importlib
    mod = importlib.import_module(f"pipeline.{module}")

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(mod, "build_parser", interrupted)
    assert mod.main([]) == 130
    assert capsys.readouterr().err.splitlines() == [f"error: interrupted{note}"]


# --------------------------------------------------------------------------- --fp32-runtime without --reliability

@pytest.mark.parametrize("argv, want", [
    ([], "onnxruntime"),
    (["--fp32-runtime", "reference"], "reference"),
    (["--fp32-runtime", "reference", "--reliability"], "reference"),
    (["--fp32-runtime", "onnxruntime", "--reliability"], "onnxruntime"),
])
def test_fp32_runtime_reaches_the_config_with_or_without_reliability(argv, want, tmp_path):
    from pipeline import export
    cfg = export.config_from_args(export.build_parser().parse_args([*argv, "--out", str(tmp_path / "o")]))
    assert cfg.fp32_runtime == want
    assert (cfg.reliability is not None) == ("--reliability" in argv)


def test_fp32_runtime_reference_runs_pytorch_in_the_run_stage(tmp_path, tinynet_dir, tiny_npz, in_dir, capsys):
    """README: the run stage's FP32 side is model.onnx on onnxruntime by default, or PyTorch itself with
    --fp32-runtime reference; the flag used to be dropped unless --reliability was given."""
    from pipeline.export import main
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    status = main(["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data",
                   str(tiny_npz), "--calib-size", "50", "--eval-limit", "64", "--fp32-runtime", "reference",
                   "--out", str(out)])
    assert status in (0, 1), capsys.readouterr().err
    r = json.loads((out / "report.json").read_text())
    assert r["config"]["fp32_runtime"] == "reference" and r["config"]["reliability"] is None
    assert r["runtime"]["fp32"]["runtime"] == "pytorch"
    assert r["accuracy"] and not math.isnan(r["runtime"]["fp32"]["seconds"])
