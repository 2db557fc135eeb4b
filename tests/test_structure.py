"""The package's layout rules: one room per concept, no cycles, oracles kept out of runtime code,
no global state leaking into a user's session, files found or a clear error."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

import navil_utils

PACKAGE = Path(navil_utils.__file__).resolve().parent
SUBPACKAGES = {"models", "processing", "tiny", "analysis", "plotting", "paper", "workbook", "reference"}


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """navil_utils modules imported anywhere in ``path`` (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("navil_utils"):
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("navil_utils")}
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_top_level_holds_only_the_api_errors_constants_chat_and_command_lines():
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top == {"__init__.py", "errors.py", "constants.py", "paths.py", "chatting.py", "train.py", "evaluate.py", "cli.py"}
    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"navil-train", "navil-evaluate", "navil-run-notebooks"}
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == SUBPACKAGES


def test_runtime_code_never_imports_the_reference_oracles():
    offenders = {name: sorted(m for m in _imports(path) if m.startswith("navil_utils.reference"))
                 for name, path in MODULES.items()
                 if not name.startswith("navil_utils.reference") and name != "navil_utils"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles_between_modules():
    graph = {name: {m for m in _imports(path) if m in MODULES and m != name and m != "navil_utils"}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_models_do_not_depend_on_processing_chat_or_the_tiny_model():
    for name, path in MODULES.items():
        if name.startswith("navil_utils.models"):
            bad = [m for m in _imports(path) if m.split(".")[1] in {"processing", "chatting", "tiny", "plotting",
                                                                    "analysis", "workbook"}]
            assert not bad, (name, bad)


def test_analysis_draws_nothing():
    for name, path in MODULES.items():
        if name.startswith("navil_utils.analysis"):
            text = path.read_text(encoding="utf-8")
            assert "matplotlib" not in text and "navil_utils.plotting" not in text, name


def test_every_public_name_resolves_to_the_module_that_defines_it():
    for name, module in navil_utils._EXPORTS.items():
        value = getattr(navil_utils, name)
        defined_in = getattr(value, "__module__", module)
        assert defined_in == module or not callable(value), (name, module, defined_in)


def test_importing_the_package_leaves_warnings_and_threads_alone():
    # third-party packages add warning filters of their own when imported: import them first
    code = ("import warnings, torch, torch.optim.lr_scheduler, transformers, matplotlib.pyplot, pandas, sympy; "
            "import matplotlib_inline.backend_inline, accelerate.scheduler, IPython.core.completer; "
            "filters = list(warnings.filters); threads = torch.get_num_threads(); "
            "import navil_utils; navil_utils.setup_notebook(threads=None); "
            "assert list(warnings.filters) == filters, 'warning filters changed'; "
            "assert torch.get_num_threads() == threads; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().endswith("ok"), result.stderr


def test_setup_notebook_does_not_silence_a_users_warnings():
    navil_utils.setup_notebook()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.warn("a user's own warning", UserWarning)
    assert [str(w.message) for w in caught] == ["a user's own warning"]


def test_files_are_found_or_a_clear_error_says_what_is_missing(tmp_path, monkeypatch):
    from navil_utils.errors import NaViLError, WorkbookFilesError
    from navil_utils import paths

    root = paths.repo_root()
    assert (root / "data" / "paper").is_dir() and (root / "tests" / "fixtures" / "golden").is_dir()
    monkeypatch.setattr(paths, "_SOURCE_ROOT", tmp_path / "site-packages")  # a non-editable install
    with pytest.raises(WorkbookFilesError, match="without the workbook's files") as err:
        paths.repo_root()
    assert isinstance(err.value, NaViLError) and "NAVIL_WORKBOOK_ROOT" in str(err.value)
    monkeypatch.setenv(paths.REPO_ROOT_ENV, str(root))
    assert paths.repo_root() == root
    monkeypatch.setenv(paths.REPO_ROOT_ENV, str(tmp_path))
    with pytest.raises(WorkbookFilesError, match="not a NaViL workbook checkout"):
        paths.repo_root()
    monkeypatch.delenv(paths.REPO_ROOT_ENV)


def test_documented_command_lines_still_run():
    env = dict(os.environ)
    for module in ("navil_utils.evaluate", "navil_utils.train", "navil_utils.workbook.run_notebooks"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                                timeout=120, env=env)
        assert result.returncode == 0 and "usage:" in result.stdout, (module, result.stderr)
