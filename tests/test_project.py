"""Project plumbing: packaging metadata, notebook set-up, figure saving, notebook runner."""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import yaml

import navil_utils
from navil_utils.plotting.style import FIGSIZE, save_figure
from navil_utils.workbook.notebook import resolve_model_path, setup_notebook

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """Distribution name of a requirement string, normalised (PEP 503)."""
    name = re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_name(r) for r in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    in_env = {_name(r) for r in pip_section if not r.startswith("-e")}
    assert declared == in_env, f"only in pyproject: {declared - in_env}; only in environment.yml: {in_env - declared}"
    assert "python=3.11" in env["dependencies"]
    # the same version specifiers, too
    spec = lambda reqs: {_name(r): r.replace(" ", "").lower() for r in reqs}  # noqa: E731
    py_specs = spec(project["dependencies"] + [r for e in project["optional-dependencies"].values() for r in e])
    env_specs = spec([r for r in pip_section if not r.startswith("-e")])
    assert py_specs == env_specs


def test_constraints_pin_every_dependency_within_its_specifier():
    """constraints.txt (used by the Makefile bootstrap) pins each dependency of pyproject, inside its range,
    so that a fresh clone installs the versions the saved outputs and figures were made with."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    lines = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = {}
    for line in lines:
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and " " not in line, f"not an exact pin: {line!r}"
            pins[_name(name)] = version
    assert "torch" not in pins and "navil-utils" not in pins  # torch: TORCH_SPEC; the project itself: -e
    for requirement in requirements:
        name = _name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert "-c $(CONSTRAINTS)" in (ROOT / "Makefile").read_text()


def test_no_torchvision_or_timm_dependency():
    text = (ROOT / "pyproject.toml").read_text() + (ROOT / "environment.yml").read_text()
    assert "torchvision" not in text and "timm" not in text


def test_ci_runs_make_test_and_makefile_has_the_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "git status --porcelain" in ci and "exit 1" in ci  # the tests must leave the tree unchanged
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run:", "test:", "lab:"):
        assert re.search(rf"^{target}", makefile, re.M), target


def test_setup_notebook_is_deterministic_and_returns_repo_root():
    root = setup_notebook(seed=123)
    a = (torch.rand(4), np.random.rand(3))
    assert setup_notebook(seed=123) == root
    b = (torch.rand(4), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    setup_notebook(seed=124)
    assert not torch.equal(torch.rand(4), a[0])
    assert (root / "pyproject.toml").exists() and root == ROOT
    assert tuple(matplotlib.rcParams["figure.figsize"]) == FIGSIZE


def test_save_figure_writes_png_and_pdf_reproducibly(tmp_path):
    import matplotlib.pyplot as plt

    setup_notebook(seed=0)
    outputs = []
    for sub in ("a", "b"):
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [0, 1, 4])
        ax.set(title="t", xlabel="x (px)", ylabel="y")
        png, pdf = save_figure(fig, "unit_test_figure", directory=tmp_path / sub)
        plt.close(fig)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
        outputs.append((png.read_bytes(), pdf.read_bytes()))
    assert outputs[0] == outputs[1], "saving the same figure twice must give identical bytes"
    with pytest.raises(ValueError):
        save_figure(fig, "nested/name.png", directory=tmp_path)


def test_resolve_model_path_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("NAVIL_MODEL_PATH", raising=False)
    assert resolve_model_path(None, default="tests/fixtures/golden/qwen3_ve") == str(ROOT / "tests/fixtures/golden/qwen3_ve")
    monkeypatch.setenv("NAVIL_MODEL_PATH", str(tmp_path))
    assert resolve_model_path(None, default="tests/fixtures/golden/qwen3_ve") == str(tmp_path)
    assert resolve_model_path("OpenGVLab/NaViL-2B") == "OpenGVLab/NaViL-2B"  # explicit value wins, hub ids pass through
    monkeypatch.delenv("NAVIL_MODEL_PATH")
    with pytest.raises(ValueError, match="NAVIL_MODEL_PATH"):
        resolve_model_path(None)


def test_public_api_is_lazily_exported():
    assert "setup_notebook" in dir(navil_utils)
    with pytest.raises(AttributeError):
        navil_utils.definitely_not_a_name  # noqa: B018


def test_run_notebooks_executes_in_place_and_is_idempotent(tmp_path):
    import nbformat

    from navil_utils.workbook.run_notebooks import execute_notebook, find_notebooks

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("import navil_utils\nROOT = navil_utils.setup_notebook(seed=0)\nimport torch\nprint(torch.rand(2))"),
        nbformat.v4.new_code_cell("import ipywidgets\nipywidgets.IntSlider(value=3)"),
        nbformat.v4.new_code_cell("import sys, time\nprint('a'); sys.stdout.flush(); time.sleep(0.3)\nprint('b')"),
        nbformat.v4.new_code_cell("# NBVAL_IGNORE_OUTPUT\nimport time\nprint(time.perf_counter_ns())"),
    ]
    path = tmp_path / "00_tiny.ipynb"
    nbformat.write(nb, path)
    assert find_notebooks([str(tmp_path)]) == [path]
    execute_notebook(path, timeout=120)
    first = path.read_text()
    executed = nbformat.read(path, as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "tensor([0.4963, 0.7682])\n"
    widget_view = executed.cells[1].outputs[0]["data"]["application/vnd.jupyter.widget-view+json"]
    state = executed.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert state[widget_view["model_id"]]["model_name"] == "IntSliderModel", "the widget shows without a kernel"
    assert state[widget_view["model_id"]]["state"]["value"] == 3
    assert [o["text"] for o in executed.cells[2].outputs] == ["a\nb\n"], "adjacent streams are merged"
    timing = executed.cells[3].outputs[0]["text"]
    execute_notebook(path, timeout=120)
    assert path.read_text() == first, "re-running an unchanged notebook must not change the file"
    execute_notebook(path, timeout=120, refresh_volatile=True)
    assert nbformat.read(path, as_version=4).cells[3].outputs[0]["text"] != timing, "refresh re-records timings"


def test_bare_import_registers_auto_classes():
    """`import navil_utils` alone lets transformers' AutoConfig/AutoModel open NaViL checkpoints."""
    import subprocess
    import sys

    code = (
        "import navil_utils, transformers\n"
        "d = 'tests/fixtures/golden/qwen3_ve'\n"
        "c = transformers.AutoConfig.from_pretrained(d)\n"
        "m = transformers.AutoModel.from_pretrained(d)\n"
        "print(type(c).__name__, type(m).__name__, sum(p.numel() for p in m.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["NaViLChatConfig", "NaViLForConditionalGeneration", "433792"]


def test_figures_dir_follows_the_environment(tmp_path, monkeypatch):
    """``$NAVIL_FIGURES_DIR`` redirects save_figure (nbval runs use it to leave figures/ untouched)."""
    import matplotlib.pyplot as plt

    from navil_utils.paths import FIGURES_DIR_ENV, figures_dir, repo_root

    monkeypatch.delenv(FIGURES_DIR_ENV, raising=False)
    assert figures_dir() == repo_root() / "figures"
    target = tmp_path / "elsewhere" / "figs"
    monkeypatch.setenv(FIGURES_DIR_ENV, str(target))
    assert figures_dir() == target and target.is_dir()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png, pdf = save_figure(fig, "redirected")
    plt.close(fig)
    assert png.parent == target and png.is_file() and pdf.is_file()
    assert not (repo_root() / "figures" / "redirected.png").exists()


def test_nbval_session_writes_figures_to_a_temporary_directory():
    """notebooks/conftest.py is what keeps ``pytest --nbval`` from rewriting the tracked figures."""
    import importlib.util

    from navil_utils.paths import FIGURES_DIR_ENV, repo_root

    spec = importlib.util.spec_from_file_location("nbval_conftest", repo_root() / "notebooks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = os.environ.get(FIGURES_DIR_ENV)
    module.pytest_configure(None)
    try:
        directory = Path(os.environ[FIGURES_DIR_ENV])
        assert directory.is_dir() and repo_root() not in directory.parents
    finally:
        module.pytest_unconfigure(None)
    assert os.environ.get(FIGURES_DIR_ENV) == before and not directory.exists()


def test_lab_settings_override_silences_news_with_settings_jupyterlab_knows():
    """`make lab` installs jupyter/overrides.json; every key must be a setting of the installed JupyterLab
    (an unknown or misspelt key would be ignored silently) with a value its schema allows."""
    import json
    import sys

    overrides = json.loads((ROOT / "jupyter" / "overrides.json").read_text())
    schemas = Path(sys.prefix) / "share" / "jupyter" / "lab" / "schemas"
    for plugin, values in overrides.items():
        package, _, name = plugin.partition(":")
        properties = json.loads((schemas / package / f"{name}.json").read_text())["properties"]
        for key, value in values.items():
            schema = properties[key]
            allowed = [option["const"] for option in schema.get("oneOf", [])]
            assert value in allowed if allowed else isinstance(value, bool) == (schema["type"] == "boolean"), key
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    assert "cp jupyter/overrides.json $(LAB_SETTINGS)/overrides.json" in (ROOT / "Makefile").read_text()
