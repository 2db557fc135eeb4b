"""Every chapter follows the workbook's conventions (papermill parameters, navil_utils, saved outputs)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_chapters_exist():
    """Chapters are numbered from 00, each number once (a planned chapter may still be missing)."""
    numbers = [int(p.stem[:2]) for p in NOTEBOOKS]
    assert numbers[0] == 0 and numbers == sorted(set(numbers))
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "title first"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one papermill `parameters` cell"
    code = [c for c in nb.cells if c.cell_type == "code"]
    source = "\n".join(c.source for c in code)
    assert "navil_utils.setup_notebook(" in source
    assert nb.metadata["kernelspec"]["name"] == "python3"
    if path.stem[:2] != "00":  # every chapter that touches a model or its budget takes model_path
        assert "model_path" in nb.cells[tagged[0]].source
    for cell in code:  # committed executed, nothing on stderr, no errors
        assert cell.execution_count is not None, f"unexecuted cell in {path.name}"
        for output in cell.outputs:
            assert output.output_type != "error"
            assert not (output.output_type == "stream" and output.name == "stderr"), cell.source[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_masked_cells_follow_nbval_and_write_nothing(path):
    """Cells whose output nbval does not compare (machine-dependent: timings, last float digits):

    - ``make run`` recognises exactly the cells nbval recognises (a marker with trailing text is
      ignored by nbval, which would compare a machine-dependent output);
    - each states why on the line after the marker;
    - none saves a figure: a figure drawn from machine-dependent values would change the tracked
      ``figures/`` on every machine.
    """
    from nbval.plugin import find_comment_markers

    from navil_utils.workbook.run_notebooks import IGNORE_OUTPUT_MARKER, is_volatile

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        nbval_ignores = dict(find_comment_markers(cell.source)).get("check") is False
        assert is_volatile(cell) == nbval_ignores, cell.source[:120]
        mentions = IGNORE_OUTPUT_MARKER in cell.source
        assert mentions == nbval_ignores, f"marker not recognised by nbval: {cell.source[:120]!r}"
        if nbval_ignores:
            lines = cell.source.splitlines()
            assert lines[0] == f"# {IGNORE_OUTPUT_MARKER}"
            assert lines[1].startswith("# why: ") and len(lines[1]) > 20, "state the reason on line 2"
            assert "save_figure" not in cell.source, "a masked cell must not write figures/"


def test_is_volatile_matches_nbval_on_edge_cases():
    from nbval.plugin import find_comment_markers

    from navil_utils.workbook.run_notebooks import is_volatile

    sources = ["# NBVAL_IGNORE_OUTPUT\nx = 1", "x = 1\n  # NBVAL_IGNORE_OUTPUT", "## NBVAL_IGNORE_OUTPUT",
               "# NBVAL_IGNORE_OUTPUT  (reason)\nx = 1", "x = 1  # NBVAL_IGNORE_OUTPUT", "x = 1"]
    for source in sources:
        cell = nbformat.v4.new_code_cell(source)
        assert is_volatile(cell) == (dict(find_comment_markers(source)).get("check") is False), source
