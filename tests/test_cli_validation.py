"""Hostile or careless command lines: every CLI (evaluate, sweep, run_notebooks) turns bad arguments and
NaViLErrors into a non-zero exit with ONE line on stderr (no traceback) and prints no result; a successful
evaluation still ends its stdout with the JSON summary.  Run as real subprocesses (``python -m ...``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from navil_utils.paths import repo_root

ROOT = repo_root()
TINY = ROOT / "data" / "models" / "navil-tiny"


def _run(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env, check=False)


def _assert_one_line_failure(result: subprocess.CompletedProcess, code: int, prog: str, *fragments: str) -> str:
    detail = f"rc={result.returncode}\nstdout={result.stdout!r}\nstderr={result.stderr!r}"
    assert result.returncode == code, detail
    assert "Traceback" not in result.stderr, detail
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, detail
    assert lines[0].startswith(f"python -m {prog}: error: "), detail
    for fragment in fragments:
        assert fragment in lines[0], detail
    assert result.stdout.strip() == "", detail  # in particular no JSON "score"
    return lines[0]


# ------------------------------------------------------------------------------------------ evaluate


@pytest.mark.parametrize("args, fragment", [
    (["--n", "0"], "argument --n: must be a positive integer (>= 1), got '0'"),
    (["--batch-size", "-1"], "argument --batch-size: must be a positive integer (>= 1), got '-1'"),
])
def test_evaluate_rejects_non_positive_counts(args, fragment):
    result = _run("navil_utils.tiny.evaluate", "--model", TINY, *args)
    _assert_one_line_failure(result, 2, "navil_utils.evaluate", fragment)


def test_evaluate_reports_a_missing_model_without_traceback(tmp_path):
    missing = tmp_path / "no-such-model"
    result = _run("navil_utils.evaluate", "--model", missing, "--n", "3")  # the documented entry point
    _assert_one_line_failure(result, 1, "navil_utils.evaluate", str(missing), "no model checkpoint directory")


def test_evaluate_reports_a_broken_model_without_traceback(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    result = _run("navil_utils.tiny.evaluate", "--model", broken, "--n", "3")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(broken) in result.stderr, result.stderr
    assert result.stdout.strip() == ""


def test_evaluate_success_keeps_json_as_last_stdout_line():
    result = _run("navil_utils.tiny.evaluate", "--model", TINY, "--n", "2", "--batch-size", "2", "--seed", "5")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n"] == 2 and summary["seed"] == 5 and 0.0 <= summary["overall"] <= 1.0


# ------------------------------------------------------------------------------------- run_notebooks


def test_run_notebooks_fails_on_a_folder_without_notebooks(tmp_path):
    (tmp_path / "notes.ipynb").write_text("{}")  # not NN_*.ipynb: not one of the workbook's notebooks
    result = _run("navil_utils.workbook.run_notebooks", tmp_path)
    _assert_one_line_failure(result, 1, "navil_utils.workbook.run_notebooks", "no notebooks", str(tmp_path))


def test_run_notebooks_fails_on_a_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    result = _run("navil_utils.workbook.run_notebooks", missing)
    _assert_one_line_failure(result, 1, "navil_utils.workbook.run_notebooks", str(missing))


def test_run_notebooks_in_process_validation(tmp_path, capsys):
    from navil_utils.errors import WorkbookFilesError
    from navil_utils.workbook.run_notebooks import find_notebooks, main

    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), "--timeout", "0"])
    assert info.value.code == 2
    assert "argument --timeout: must be a positive integer" in capsys.readouterr().err
    text = tmp_path / "readme.txt"
    text.write_text("hi")
    assert main([str(text)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a notebook" in err[0]
    with pytest.raises(WorkbookFilesError) as found:  # still a FileNotFoundError for old callers
        find_notebooks([str(tmp_path / "empty-dir-does-not-exist")])
    assert isinstance(found.value, FileNotFoundError)
    (tmp_path / "01_a.ipynb").write_text("{}")
    assert find_notebooks([str(tmp_path)]) == [tmp_path / "01_a.ipynb"]


# --------------------------------------------------------------------------------------------- sweep


def test_sweep_rejects_a_missing_config(tmp_path):
    missing = tmp_path / "grid.json"
    result = _run("navil_utils.tiny.sweep", missing, "--results", tmp_path / "r.jsonl")
    _assert_one_line_failure(result, 2, "navil_utils.tiny.sweep", "no grid spec file at", str(missing))
    assert not (tmp_path / "r.jsonl").exists()


def test_sweep_rejects_invalid_json(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text('{"llm": [[64, 2]],\n "vit": oops}')
    result = _run("navil_utils.tiny.sweep", grid, "--results", tmp_path / "r.jsonl")
    _assert_one_line_failure(result, 2, "navil_utils.tiny.sweep", f"{grid} is not valid JSON (line 2")


def test_sweep_rejects_non_positive_workers(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"llm": [[32, 1]], "vit": [[32, 1]], "samples": [64]}))
    result = _run("navil_utils.tiny.sweep", grid, "--results", tmp_path / "r.jsonl", "--workers", "0")
    _assert_one_line_failure(result, 2, "navil_utils.tiny.sweep", "argument --workers: must be a positive integer")
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("spec, code, fragment", [
    ([1, 2, 3], 2, "must hold a JSON object (a grid spec), not a list"),
    ({}, 1, "the grid spec defines no runs"),
    ({"llm": [[64, 2]], "vit": [[32, 2]], "samples": [64], "colour": "red"}, 1, "unknown sweep options ['colour']"),
    ({"llm": 5, "vit": [[32, 2]], "samples": [64]}, 1, "invalid grid spec (TypeError"),
])
def test_sweep_in_process_spec_validation(tmp_path, capsys, spec, code, fragment):
    from navil_utils.tiny.sweep import main

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(spec))
    argv = [str(grid), "--results", str(tmp_path / "r.jsonl"), "--no-progress", "--device", "cpu"]
    if code == 2:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    else:
        assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and fragment in lines[0], captured.err
    assert not (tmp_path / "r.jsonl").exists()


def test_sweep_rejects_a_results_directory(tmp_path, capsys):
    from navil_utils.tiny.sweep import main

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"llm": [[32, 1]], "vit": [[32, 1]], "samples": [64]}))
    with pytest.raises(SystemExit) as info:
        main([str(grid), "--results", str(tmp_path), "--device", "cpu"])
    assert info.value.code == 2 and "is a directory, expected a JSONL file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ train


@pytest.mark.parametrize("make_args, fragment", [
    (lambda d: ["--config", d / "missing.json"], "missing.json"),
    (lambda d: ["--config", d / "broken.json"], "is not valid JSON"),
    (lambda d: ["--config", d / "list.json"], "must hold a JSON object"),
    (lambda d: ["--set", "lr"], "--set expects KEY=JSON"),
    (lambda d: ["--time-limit", "-3"], "argument --time-limit: must be a finite number > 0"),
    (lambda d: ["--set", "lr=-1"], "lr"),
])
def test_train_rejects_bad_arguments_before_touching_the_run_directory(tmp_path, make_args, fragment):
    (tmp_path / "broken.json").write_text("{\"lr\": ")
    (tmp_path / "list.json").write_text("[1, 2]")
    out = tmp_path / "run"
    result = _run("navil_utils.train", "--out", out, *make_args(tmp_path), timeout=120)
    _assert_one_line_failure(result, 2, "navil_utils.train", fragment)
    assert not out.exists(), "a refused launch leaves no run directory behind"
