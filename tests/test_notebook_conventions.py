"""Every chapter follows the workbook's conventions (papermill parameters, navil_utils, saved outputs)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_chapters_exist():
    assert [p.stem[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(len(NOTEBOOKS))]
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
