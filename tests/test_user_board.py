"""Your own board: --ram/--flash over a TFLite-Micro target and --target-file (TOML or JSON), pipeline/targets/user.py.

Bad input is one line, exit 2, no traceback and nothing written; a good board reaches the report (target
``budget_source: "user"``), the summary, report.html and the firmware package (its core's compiler flags)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import targets
from pipeline.errors import TargetError, UsageError
from pipeline.export import main
from pipeline.targets.user import UserBudget, parse_size, read_board

BOARD = """\
name = "myboard"
core = "cortex-m33"
clock_mhz = 64
ram = "256KiB"
flash = "1MiB"
arena_margin = 0.3
"""


@pytest.mark.parametrize("text, expected", [
    ("256KiB", 262_144), ("1MiB", 1_048_576), ("1MB", 1_000_000), ("512 KB", 512_000), ("4096", 4096), (4096, 4096),
    ("1.5MiB", 1_572_864), ("2gib", 2 * 2 ** 30), ("100B", 100),
])
def test_sizes_with_units(text, expected):
    assert parse_size(text, "--ram") == expected


@pytest.mark.parametrize("text, message", [
    ("256K", "is ambiguous; write 256KiB (262,144 B) or 256KB (256,000 B)"),
    ("0", "not a positive size"), ("-1KiB", "not a positive size"), (-5, "not a positive size"),
    ("1.5XB", "unknown unit 'XB'"), ("lots", "is not a size"), ("0.5B", "not a whole number of bytes"),
    (True, "is not a size"), (1.5, "is not a size"), ("2TiB", "unknown unit"), (2 ** 41, "above 1 TiB"),
])
def test_bad_sizes_are_one_line(text, message):
    with pytest.raises(UsageError) as e:
        parse_size(text, "--ram")
    assert message in str(e.value) and "\n" not in str(e.value) and e.value.exit_status == 2


def test_flags_override_the_budget_of_a_registered_target_only_for_that_export():
    base = targets.get_target("cortex-m4")
    t = targets.get_target("cortex-m4", UserBudget(given_by="--ram 256KiB", ram_bytes=262_144))
    assert (t.ram_bytes, t.flash_bytes, t.budget_source, t.budget_given_by) == (262_144, base.flash_bytes, "user",
                                                                                "--ram 256KiB")
    assert (t.core, t.arena_margin, t.clock_mhz) == (base.core, base.arena_margin, base.clock_mhz)
    assert t.device == "your cortex-m4 board (--ram 256KiB)" and t.references[1:] == base.references
    again = targets.get_target("cortex-m4")
    assert again is base and again.budget_source == "profile" and again.ram_bytes == 640 * 1024  # registry untouched


def test_a_board_file_is_read_with_defaults(tmp_path):
    (tmp_path / "b.toml").write_text(BOARD)
    b = read_board(tmp_path / "b.toml")
    assert b == {"name": "myboard", "core": "cortex-m33", "ram_bytes": 262_144, "flash_bytes": 1_048_576,
                 "clock_mhz": 64, "arena_margin": 0.3, "flash_margin": 0.25, "kernels": "cmsis-nn", "description": None}
    (tmp_path / "b.json").write_text(json.dumps({"name": "j", "core": "Cortex-M0plus", "ram": 32768, "flash": "256KB",
                                                  "kernels": "reference"}))
    j = read_board(tmp_path / "b.json")
    assert (j["core"], j["ram_bytes"], j["flash_bytes"], j["kernels"]) == ("cortex-m0plus", 32768, 256_000, "reference")


# (file name, contents, message) for board files refused with one line
BAD_BOARDS = [
    ("typo.toml", BOARD.replace("ram =", "ram_kb ="), "unknown key 'ram_kb'; did you mean 'ram'?"),
    ("unit.toml", BOARD.replace('"256KiB"', '"256KB2"'), "ram '256KB2' is not a size"),
    ("ambiguous.toml", BOARD.replace('"1MiB"', '"1M"'), "is ambiguous; write 1MiB"),
    ("zero.toml", BOARD.replace('"1MiB"', "0"), "flash 0 is not a positive size"),
    ("negative.toml", BOARD.replace('"256KiB"', "-4096"), "ram -4096 is not a positive size"),
    ("core.toml", BOARD.replace("cortex-m33", "cortex m33"), "unknown core 'cortex m33'; did you mean 'cortex-m33'"),
    ("margin.toml", BOARD.replace("0.3", "1.0"), "arena_margin 1.0 is outside [0, 1)"),
    ("margin2.toml", BOARD + "flash_margin = -0.1\n", "flash_margin -0.1 is outside [0, 1)"),
    ("missing.toml", BOARD.replace('flash = "1MiB"\n', ""), "missing flash"),
    ("builtin.toml", BOARD.replace('"myboard"', '"cortex-m4"'), "'cortex-m4' is a built-in target"),
    ("kernels.toml", BOARD + 'kernels = "cmsis"\n', "kernels 'cmsis' is not one of cmsis-nn, reference"),
    ("syntax.toml", BOARD + "ram = \n", "is not valid TOML"),
    ("list.json", "[1, 2]", "holds a list, not a table"),
    ("typo.json", json.dumps({"name": "j", "core": "cortex-m4", "ram": 1024, "flash": 1024, "clock": 80}),
     "unknown key 'clock'; did you mean 'clock_mhz'?"),
    ("clock.toml", BOARD.replace("64", "-64"), "clock_mhz -64 is not a whole positive number"),
]


@pytest.mark.parametrize("name, text, message", BAD_BOARDS, ids=[b[0] for b in BAD_BOARDS])
def test_bad_board_files_are_one_line_and_write_nothing(name, text, message, tmp_path, capsys):
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    status = main(["--target-file", str(tmp_path / name), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(TargetError):
        read_board(tmp_path / name)


@pytest.mark.parametrize("args, message", [
    (["--target", "tflite-int8", "--ram", "256KiB"], "--ram applies to TFLite-Micro targets"),
    (["--flash", "1MiB"], "--flash applies to TFLite-Micro targets (cortex-m4, cortex-m7 or a --target-file board); "
                          "tflite-int8 runs on LiteRT"),
    (["--target", "cortex-m4", "--ram", "256K"], "--ram '256K' is ambiguous"),
    (["--target", "cortex-m4", "--ram", "0"], "--ram '0' is not a positive size"),
    (["--target", "cortex-m4,cortex-m7", "--ram", "1MiB"], "applies to one TFLite-Micro target"),
    (["--target", "cortex-m7", "--target-file", "BOARD"], "--target cortex-m7 conflicts with --target-file"),
    (["--target-file", "missing.toml"], "cannot read --target-file missing.toml"),
])
def test_bad_flags_are_one_line_and_write_nothing(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "board.toml").write_text(BOARD)
    out = tmp_path / "out"
    status = main([a.replace("BOARD", "board.toml") for a in args] + ["--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_the_board_name_may_be_repeated_as_the_target(tmp_path):
    from pipeline.targets.user import from_flags
    (tmp_path / "b.toml").write_text(BOARD)
    name, user = from_flags("myboard", None, "2MiB", str(tmp_path / "b.toml"), "tflite-int8")
    t = targets.get_target(name, user)
    assert (t.name, t.flash_bytes, t.ram_bytes, t.core) == ("myboard", 2 * 2 ** 20, 262_144, "cortex-m33")
    assert user.given_by == f"--target-file {tmp_path / 'b.toml'} --flash 2MiB"


# --------------------------------------------------------------------------- end to end

def _export(tmp_path, *args) -> tuple[int, Path, dict, str]:
    out = tmp_path / "out"
    status = main(["--model", "zoo:refcnn", "--eval-limit", "100", "--micro-limit", "10", "--calib-size", "100",
                   "--out", str(out), *args])
    return status, out, json.loads((out / "report.json").read_text()), (out / "report.html").read_text()


def test_a_board_file_export_says_the_budget_came_from_the_user(tmp_path, capsys):
    board = tmp_path / "myboard.toml"
    board.write_text(BOARD)
    status, out, r, html = _export(tmp_path, "--target-file", str(board))
    text = capsys.readouterr().out
    assert status == 0, text
    t = r["target"]
    assert (t["name"], t["core"], t["ram_bytes"], t["flash_bytes"], t["clock_mhz"]) == ("myboard", "cortex-m33",
                                                                                         262_144, 1_048_576, 64)
    assert t["budget_source"] == "user" and t["budget_given_by"] == f"--target-file {board}"
    assert r["config"]["user_budget"]["board"]["ram_bytes"] == 262_144 and r["config"]["target"] == "myboard"
    ram = r["device"]["tflite_micro"]["ram_check"]
    assert ram["budget_bytes"] == 262_144 and ram["margin"] == 0.3 and r["gates"]["arena_fits_ram"]["limit"] == 262_144
    assert f"budget     given by you: --target-file {board} (RAM 262,144 B, flash 1,048,576 B, core cortex-m33)" in text
    assert "Budget given by you" in html and str(board) in html
    f = r["firmware"]
    assert f["gcc_flags"] == ["-mcpu=cortex-m33", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-sp-d16"]
    assert f["budget_source"] == "user" and f["flash"]["measured"] is True
    assert f["arena"]["tensor_arena_size"] >= r["device"]["tflite_micro"]["arena_bytes"] * 1.3
    readme = (out / "firmware" / "README.txt").read_text()
    assert "TARGET_ARCH=cortex-m33" in readme and f"given by you: --target-file {board})" in readme


def test_a_ram_flag_too_small_fails_the_arena_gate_with_the_users_figure(tmp_path, capsys):
    status, out, r, html = _export(tmp_path, "--target", "cortex-m4", "--ram", "64KiB", "--flash", "1MiB")
    text = capsys.readouterr().out
    assert status == 1 and "FAIL (arena_fits_ram)" in text
    assert "does not fit the 65,536 B RAM budget of your cortex-m4 board (--ram 64KiB --flash 1MiB)" in text
    assert r["target"]["budget_source"] == "user" and r["target"]["budget_given_by"] == "--ram 64KiB --flash 1MiB"
    assert r["target"]["name"] == "cortex-m4" and r["target"]["flash_bytes"] == 1_048_576
    assert "budget     given by you: --ram 64KiB --flash 1MiB" in text and "Budget given by you" in html
    assert (out / "firmware" / "model_data.cc").is_file()  # a failing gate still writes the export
