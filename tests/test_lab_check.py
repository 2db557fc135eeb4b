"""The browser check's pure parts: which notebooks it opens, what it expects of each (from the committed
outputs), how it reads the notebook JupyterLab saved, and its errors.  The browser run itself is
`make lab-check` (run by .ci/run after the tests)."""
from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from navil_utils.paths import repo_root
from navil_utils.workbook.lab_check import (LabCheckError, chapter_notebooks, expected_outputs, find_chromium,
                                            saved_problems)

NOTEBOOKS = repo_root() / "notebooks"


def test_chapter_notebooks_are_the_numbered_ones_in_order(tmp_path):
    for name in ("01_b.ipynb", "00_a.ipynb", "scratch.ipynb", "10_c.ipynb", "02_d.txt"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in chapter_notebooks(tmp_path)] == ["00_a.ipynb", "01_b.ipynb", "10_c.ipynb"]
    assert [p.name for p in chapter_notebooks(tmp_path, "01")] == ["01_b.ipynb"]
    with pytest.raises(LabCheckError, match="starting with '99'"):
        chapter_notebooks(tmp_path, "99")
    assert [p.name for p in chapter_notebooks(NOTEBOOKS)][:3] == ["00_navil_at_a_glance.ipynb", "01_loading.ipynb",
                                                                  "02_multiscale_preprocessing.ipynb"]


def test_expected_outputs_of_the_committed_widget_notebooks():
    for name in ("02_multiscale_preprocessing.ipynb", "04_attention_maps.ipynb"):
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        expected = expected_outputs(NOTEBOOKS / name)
        assert expected.code_cells == len(code)
        assert len(expected.widget_cells) == 1  # the explorer widget, saved with its state
        widget_cell = code[expected.widget_cells[0]]
        assert "explorer(" in widget_cell.source
        pngs = [i for i, cell in enumerate(code) if any("image/png" in o.get("data", {}) for o in cell.outputs)]
        assert expected.figure_cells == pngs and len(pngs) >= 6


def _notebook(tmp_path, cells):
    notebook = nbformat.v4.new_notebook(cells=cells)
    path = tmp_path / "00_x.ipynb"
    nbformat.write(notebook, path)
    return path


def test_saved_problems_reports_errors_stderr_and_unexecuted_cells(tmp_path):
    ok = nbformat.v4.new_code_cell("1", execution_count=1,
                                   outputs=[nbformat.v4.new_output("stream", name="stdout", text="fine\n")])
    failed = nbformat.v4.new_code_cell("x", execution_count=2,
                                       outputs=[nbformat.v4.new_output("error", ename="NameError",
                                                                       evalue="name 'x' is not defined",
                                                                       traceback=[])])
    noisy = nbformat.v4.new_code_cell("warn", execution_count=3,
                                      outputs=[nbformat.v4.new_output("stream", name="stderr", text="Warning!\n")])
    never = nbformat.v4.new_code_cell("later")
    path = _notebook(tmp_path, [nbformat.v4.new_markdown_cell("# t"), ok, failed, noisy, never])
    problems = saved_problems(path)
    assert problems == ["code cell 1 raised NameError: name 'x' is not defined",
                        "code cell 2 wrote to stderr: 'Warning!'",
                        "code cell 3 was not executed"]
    assert saved_problems(_notebook(tmp_path, [ok])) == []


def test_find_chromium_errors_name_the_path(tmp_path, monkeypatch):
    with pytest.raises(LabCheckError, match="not found at '/no/such/chrome'"):
        find_chromium("/no/such/chrome")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CHROMIUM", raising=False)
    with pytest.raises(LabCheckError, match="apt-get install chromium"):
        find_chromium()
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_chromium() == str(fake)


def test_cli_reports_no_notebooks_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "navil_utils.workbook.lab_check", "--notebooks", str(tmp_path),
                             "--no-shots"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"python -m navil_utils.workbook.lab_check: error: no numbered notebooks in "
                                     f"{tmp_path}")
    assert result.stdout == ""
