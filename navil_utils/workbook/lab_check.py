"""``make lab-check``: run every numbered notebook through JupyterLab's own UI in a headless Chromium.

What ``pytest --nbval`` cannot see is whether the notebooks work the way a reader uses them: opened in
JupyterLab, run with *Run ▸ Run All Cells*, figures drawn in the page and the ipywidgets controls live.
This check starts JupyterLab on a free local port (token authentication on; the token is read from the
server's runtime file), drives Debian's ``chromium`` with Playwright, and for each notebook

- opens it, runs all cells from the *Run* menu and waits until the kernel is idle;
- fails on an error output, on any output to stderr, on a cell still running after ``--cell-timeout``
  seconds, and on a figure missing where the committed notebook has one;
- checks every ipywidgets view renders as controls (not a ``VBox(...)`` text or "Error displaying
  widget"), that no control's label or value read-out is cut off, and moves each control once: the figure
  it drives must change;
- saves a screenshot to ``--shots`` (``figures/lab/NN_name.png`` by default).

The notebooks run as temporary copies and their figures go to a temporary directory, so the check never
modifies the repository (apart from the screenshots).  JupyterLab runs with the project's settings
overrides (``jupyter/overrides.json``: no news pop-up, no update check) and a fresh, empty user settings
directory; the check fails if the news pop-up appears anyway.

    python -m navil_utils.workbook.lab_check [--only 02] [--shots DIR] [--chromium PATH]
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from navil_utils.cli import ArgumentParser, positive_int, report_error
from navil_utils.errors import NaViLError
from navil_utils.paths import FIGURES_DIR_ENV, repo_root

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
#: Numbered chapters: ``00_name.ipynb`` … (helpers and scratch notebooks are not chapters).
CHAPTER_PATTERN = re.compile(r"^\d\d_.+\.ipynb$")
#: The page text of JupyterLab's "receive official Jupyter news?" notification.
NEWS_PROMPT = "Jupyter news"
PROG = "python -m navil_utils.workbook.lab_check"
#: The code cells of the notebook in the visible tab.
CODE_CELLS = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell"


class LabCheckError(NaViLError):
    """The browser check could not run (no Chromium, no Playwright, JupyterLab did not start)."""


@dataclass
class ExpectedOutputs:
    """What the committed notebook shows, per code cell (index among code cells)."""

    code_cells: int
    figure_cells: list[int] = field(default_factory=list)
    widget_cells: list[int] = field(default_factory=list)


@dataclass
class NotebookReport:
    name: str
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    controls_moved: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    screenshot: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def chapter_notebooks(directory: Path, only: str | None = None) -> list[Path]:
    """The numbered notebooks of ``directory`` in order; ``only`` keeps names starting with it (e.g. ``"02"``)."""
    paths = sorted(p for p in Path(directory).iterdir() if CHAPTER_PATTERN.match(p.name))
    if only:
        paths = [p for p in paths if p.name.startswith(only)]
    if not paths:
        raise LabCheckError(f"no numbered notebooks in {directory}" + (f" starting with {only!r}" if only else ""))
    return paths


def expected_outputs(path: Path) -> ExpectedOutputs:
    """Which code cells of the committed notebook at ``path`` show a figure (a PNG) or a widget."""
    notebook = json.loads(Path(path).read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    expected = ExpectedOutputs(code_cells=len(code))
    for i, cell in enumerate(code):
        kinds = set()
        for output in cell.get("outputs", []):
            kinds.update((output.get("data") or {}).keys())
        if WIDGET_MIME in kinds:
            expected.widget_cells.append(i)
        elif "image/png" in kinds:
            expected.figure_cells.append(i)
    return expected


def saved_problems(path: Path) -> list[str]:
    """Errors and stderr in the notebook JupyterLab saved at ``path`` (code cell numbers from 0)."""
    notebook = json.loads(Path(path).read_text())
    problems = []
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    for i, cell in enumerate(code):
        if not cell.get("execution_count"):
            problems.append(f"code cell {i} was not executed")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"code cell {i} raised {output.get('ename')}: {output.get('evalue', '')[:200]}")
            elif output.get("output_type") == "stream" and output.get("name") == "stderr":
                text = "".join(output.get("text", ""))
                problems.append(f"code cell {i} wrote to stderr: {text.strip()[:200]!r}")
    return problems


def find_chromium(explicit: str | None = None) -> str:
    """Path of the Chromium binary: ``explicit``, ``$CHROMIUM``, or ``chromium``/``chromium-browser`` on PATH."""
    for candidate in (explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if not candidate:
            continue
        found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if found:
            return found
        if candidate in (explicit, os.environ.get("CHROMIUM")):
            raise LabCheckError(f"Chromium not found at {candidate!r}")
    raise LabCheckError("no Chromium on PATH: install Debian's `chromium` (apt-get install chromium) or pass "
                        "--chromium /path/to/chrome")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lab_settings(workdir: Path) -> dict[str, str]:
    """Environment for a JupyterLab isolated from the user's own set-up, with the project's overrides.

    The overrides file is installed where JupyterLab reads it (``<prefix>/share/jupyter/lab/settings``),
    exactly as ``make lab`` does; user settings, workspaces, config and runtime files live in ``workdir``.
    Notebooks are shown without windowing so every cell is in the page.
    """
    settings_dir = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings"
    settings_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo_root() / "jupyter" / "overrides.json", settings_dir / "overrides.json")
    user_settings = workdir / "user-settings"
    tracker = user_settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True, exist_ok=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    env = dict(os.environ)
    env.update({
        "JUPYTERLAB_SETTINGS_DIR": str(user_settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(workdir / "workspaces"),
        "JUPYTER_CONFIG_DIR": str(workdir / "config"),
        "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
        FIGURES_DIR_ENV: str(workdir / "figures"),
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("NAVIL_MODEL_PATH", None)  # the committed outputs are those of the embedded model
    return env


class JupyterLabServer:
    """``jupyter lab`` on a free port in a subprocess; ``url`` and ``token`` once :meth:`start` returns."""

    def __init__(self, root_dir: Path, workdir: Path, env: dict[str, str], start_timeout: float = 120):
        self.root_dir, self.workdir, self.env, self.start_timeout = root_dir, workdir, env, start_timeout
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = ""
        self.log_path = workdir / "jupyterlab.log"

    def start(self) -> JupyterLabServer:
        command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={self.port}",
                   "--ServerApp.ip=127.0.0.1", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={self.root_dir}",
                   "--LabApp.news_url=", "--ServerApp.terminals_enabled=False"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI runners often run as root
            command.append("--allow-root")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        runtime = Path(self.env["JUPYTER_RUNTIME_DIR"])
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LabCheckError(f"JupyterLab exited with status {self.process.returncode}; log: "
                                    f"{self.log_path.read_text()[-1500:]}")
            for info_file in runtime.glob("jpserver-*.json"):
                info = json.loads(info_file.read_text() or "{}")
                if info.get("port") == self.port and info.get("pid") == self.process.pid:
                    self.token = info.get("token", "")
                    if not self.token:
                        raise LabCheckError("JupyterLab started without token authentication")
                    return self
            time.sleep(0.5)
        self.stop()
        raise LabCheckError(f"JupyterLab did not start within {self.start_timeout:.0f} s; log: {self.log_path}")

    def _api(self, method: str, route: str):
        import urllib.request

        request = urllib.request.Request(f"{self.url}/api/{route}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shut_down_kernels(self) -> None:
        """Shut down every running kernel (one notebook's kernel must not hold memory during the next)."""
        for kernel in self._api("GET", "kernels") or []:
            self._api("DELETE", f"kernels/{kernel['id']}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()


# ---------------------------------------------------------------------------------------------------
# in the page

#: Per code cell: its input prompt text ("[ ]:", "[*]:", "[3]:"), whether its outputs hold an image,
#: a rendered widget, a widget that failed to render, and any control whose text is cut off.
_CELL_STATE_JS = """
(selector) => Array.from(document.querySelectorAll(selector))
  .map((cell) => {
    const prompt = cell.querySelector('.jp-InputArea-prompt');
    const outputs = cell.querySelector('.jp-OutputArea');
    const text = outputs ? outputs.innerText : '';
    const clipped = [];
    if (outputs) {
      for (const el of outputs.querySelectorAll('.widget-readout, .widget-label, .widget-dropdown select')) {
        if (el.offsetParent !== null && el.scrollWidth > el.clientWidth + 1) {
          clipped.push((el.className || el.tagName) + ': ' + (el.innerText || el.value || '').slice(0, 40));
        }
      }
    }
    return {
      prompt: prompt ? prompt.innerText.trim() : '',
      images: outputs ? outputs.querySelectorAll('img').length : 0,
      widgets: outputs ? outputs.querySelectorAll('.jupyter-widgets').length : 0,
      widgetError: /Error displaying widget|Loading widget|VBox\\(children=|HBox\\(children=/.test(text),
      clipped: clipped,
    };
  })
"""


def _cells(page) -> list[dict]:
    return page.evaluate(_CELL_STATE_JS, CODE_CELLS)


def _kernel_idle(page) -> bool:
    status = page.evaluate("""() => {
      const el = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
      return el ? el.getAttribute('data-status') : null; }""")
    return status == "idle"


def _wait(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _run_all_from_menu(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


def _started(page) -> bool:
    """Whether any code cell is running or has run."""
    return any(c["prompt"] == "[*]:" or re.fullmatch(r"\[\d+\]:", c["prompt"]) for c in _cells(page))


def _dialog_text(page) -> str:
    dialog = page.locator(".jp-Dialog")
    return " ".join(dialog.first.inner_text().split()) if dialog.count() else ""


def run_all_cells(page, attempts: int = 3, wait: float = 20) -> int:
    """*Run ▸ Run All Cells*; a click that started nothing (menu still closing, notebook not yet focused) is
    repeated up to ``attempts`` times. Returns the number of clicks it took, 0 if no cell started."""
    for attempt in range(1, attempts + 1):
        page.keyboard.press("Escape")  # close a menu left open by an earlier attempt
        _run_all_from_menu(page)
        try:
            _wait(lambda: _started(page), wait, "a cell to start")
            return attempt
        except TimeoutError:
            continue
    return 0


def _wait_for_run(page, n_cells: int, cell_timeout: float, report: NotebookReport) -> None:
    """Poll the input prompts until every code cell ran or the kernel went idle; enforce the cell timeout."""
    started = last_change = time.monotonic()
    done_before = -1
    while True:
        cells = _cells(page)
        prompts = [c["prompt"] for c in cells]
        done = sum(bool(re.fullmatch(r"\[\d+\]:", p)) for p in prompts)
        running = [i for i, p in enumerate(prompts) if p == "[*]:"]
        if done != done_before:
            done_before, last_change = done, time.monotonic()
        if done == n_cells and not running and _kernel_idle(page):
            return
        if not running and _kernel_idle(page) and time.monotonic() - last_change > 10:
            stuck = [i for i, p in enumerate(prompts) if not re.fullmatch(r"\[\d+\]:", p)]
            report.problems.append(f"run stopped before code cell {stuck[0]} (an earlier cell failed?)")
            return
        if running and time.monotonic() - last_change > cell_timeout:
            report.problems.append(f"code cell {running[0]} still running after {cell_timeout:.0f} s")
            return
        if time.monotonic() - started > cell_timeout * max(n_cells, 1):
            report.problems.append("the notebook did not finish")
            return
        time.sleep(0.5)


def _widget_image_sources(page, cell_index: int) -> list[str]:
    return page.evaluate("""([selector, i]) => {
      const cell = document.querySelectorAll(selector)[i];
      return Array.from(cell.querySelectorAll('.jp-OutputArea .jupyter-widgets img')).map((img) => img.src); }""",
                         [CODE_CELLS, cell_index])


def _move_controls(page, cell_index: int, report: NotebookReport, timeout: float) -> None:
    """Change every dropdown and slider of the widget in code cell ``cell_index`` once; its figure must change."""
    cell = page.locator(CODE_CELLS).nth(cell_index)
    selects = cell.locator(".jp-OutputArea .widget-dropdown select")
    sliders = cell.locator(".jp-OutputArea .widget-slider .noUi-handle")
    controls = [("dropdown", selects.nth(k)) for k in range(selects.count())]
    controls += [("slider", sliders.nth(k)) for k in range(sliders.count())]
    if not controls:
        report.problems.append(f"code cell {cell_index}: widget without a control to move")
    for kind, control in controls:
        before = _widget_image_sources(page, cell_index)
        if kind == "dropdown":
            options = control.locator("option")
            label = control.evaluate("(el) => el.closest('.widget-dropdown').innerText.split('\\n')[0]")
            current = control.evaluate("(el) => el.selectedIndex")
            target = current - 1 if current > 0 else 1
            control.select_option(index=target)
            moved = f"{label or 'dropdown'} → {options.nth(target).inner_text().strip()}"
        else:
            control.scroll_into_view_if_needed()
            value_before = control.get_attribute("aria-valuenow")
            control.focus()
            control.press("ArrowLeft")
            if control.get_attribute("aria-valuenow") == value_before:
                control.press("ArrowRight")
            row = control.locator("xpath=ancestor::*[contains(@class, 'widget-hbox')][1]")
            moved = "slider: " + (" ".join(row.inner_text().split()) if row.count() else "moved")
        try:
            _wait(lambda: (sources := _widget_image_sources(page, cell_index)) and sources != before, timeout,
                  f"the figure to change after moving {moved}")
        except TimeoutError as error:
            report.problems.append(f"code cell {cell_index}: {error}")
            continue
        report.controls_moved.append(moved)


def check_notebook(page, server: JupyterLabServer, path: Path, committed: Path, *, cell_timeout: float,
                   shots: Path | None, control_timeout: float = 60) -> NotebookReport:
    """Open ``path`` (a temporary copy of ``committed``) in Lab, run it, check it; see the module docstring."""
    report = NotebookReport(path.name)
    expected = expected_outputs(committed)
    started = time.monotonic()
    # A workspace of its own per notebook: Lab does not reopen the previous notebooks' tabs (and kernels).
    page.goto(f"{server.url}/lab/workspaces/check-{path.stem}/tree/{path.name}?token={server.token}")
    try:
        _wait(lambda: len(_cells(page)) == expected.code_cells and _kernel_idle(page), 120,
              f"{path.name} to open with an idle kernel")
    except TimeoutError as error:
        report.problems.append(str(error))
        return report
    clicks = run_all_cells(page)
    if clicks > 1:
        report.notes.append(f"Run All took {clicks} clicks")
    if not clicks:
        dialog = _dialog_text(page)
        report.problems.append("Run ▸ Run All Cells started no cell (3 attempts)" + (f"; dialog: {dialog!r}" if dialog else ""))
        return report
    _wait_for_run(page, expected.code_cells, cell_timeout, report)
    report.seconds = time.monotonic() - started
    if NEWS_PROMPT in page.inner_text("body"):
        report.problems.append("JupyterLab showed its news pop-up (settings override not applied)")
    cells = _cells(page)
    for i in expected.figure_cells:
        if i < len(cells) and cells[i]["images"] == 0:
            report.problems.append(f"code cell {i}: figure missing (the committed notebook shows one)")
    for i in expected.widget_cells:
        try:
            _wait(lambda: (c := _cells(page)[i])["widgets"] > 0 and c["images"] > 0 and not c["widgetError"], 60,
                  f"the widget of code cell {i} to render")
        except TimeoutError as error:
            report.problems.append(f"code cell {i}: {error}")
            continue
        clipped = _cells(page)[i]["clipped"]
        if clipped:
            report.problems.append(f"code cell {i}: control text cut off: {clipped}")
    if shots is not None:  # the notebook as it ran: the first widget (or figure) in view, controls untouched
        report.screenshot = _screenshot(page, (expected.widget_cells or expected.figure_cells or [0])[0],
                                        shots / f"{path.stem}.png")
    for i in expected.widget_cells:
        _move_controls(page, i, report, control_timeout)
    page.keyboard.press("Control+s")
    _wait(lambda: "Saving completed" in page.inner_text(".jp-StatusBar-Widget, #jp-main-statusbar") or None, 30,
          "JupyterLab to save the notebook")
    report.problems.extend(saved_problems(path))
    server.shut_down_kernels()
    return report


def _screenshot(page, cell_index: int, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    page.locator(CODE_CELLS).nth(cell_index).scroll_into_view_if_needed()
    page.mouse.move(0, 0)  # no hover highlights in the picture
    page.screenshot(path=str(target))
    return str(target)


def run_lab_check(notebooks: list[Path], *, chromium: str, shots: Path | None, cell_timeout: float,
                  viewport: tuple[int, int] = (1400, 1000)) -> list[NotebookReport]:
    """Run the check over ``notebooks`` (committed paths) and return one report per notebook."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise LabCheckError("Playwright is not installed: pip install playwright (its browser download is not "
                            "needed; the check drives the system Chromium)") from None
    reports = []
    with tempfile.TemporaryDirectory(prefix="navil-lab-check-") as tmp:
        workdir = Path(tmp)
        root = workdir / "notebooks"
        root.mkdir()
        for path in notebooks:
            shutil.copy2(path, root / path.name)
        server = JupyterLabServer(root, workdir, lab_settings(workdir)).start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
                try:
                    for path in notebooks:
                        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
                        try:
                            report = check_notebook(page, server, root / path.name, path, cell_timeout=cell_timeout,
                                                    shots=shots)
                        except Exception as error:  # a broken page is a failed check, not a crash of the others
                            report = NotebookReport(path.name, problems=[f"{type(error).__name__}: {error}"])
                        finally:
                            page.close()
                        reports.append(report)
                        _print_report(report)
                finally:
                    browser.close()
        finally:
            server.stop()
    return reports


def _print_report(report: NotebookReport) -> None:
    status = "ok" if report.ok else "FAIL"
    moved = f"; controls moved: {', '.join(report.controls_moved)}" if report.controls_moved else ""
    notes = f" [{'; '.join(report.notes)}]" if report.notes else ""
    print(f"{status:4} {report.name} ({report.seconds:.0f} s){moved}{notes}", flush=True)
    for problem in report.problems:
        print(f"     - {problem}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", type=Path, default=None, help="directory of numbered notebooks")
    parser.add_argument("--only", default=None, help="only notebooks whose name starts with this, e.g. 02")
    parser.add_argument("--shots", type=Path, default=None, help="screenshot directory (default figures/lab)")
    parser.add_argument("--no-shots", action="store_true", help="take no screenshots")
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: $CHROMIUM or chromium on PATH)")
    parser.add_argument("--cell-timeout", type=positive_int, default=900, help="seconds one cell may run")
    args = parser.parse_args(argv)
    try:
        notebooks = chapter_notebooks(args.notebooks or repo_root() / "notebooks", args.only)
        chromium = find_chromium(args.chromium)
        shots = None if args.no_shots else (args.shots or repo_root() / "figures" / "lab")
        started = time.monotonic()
        reports = run_lab_check(notebooks, chromium=chromium, shots=shots, cell_timeout=args.cell_timeout)
    except NaViLError as error:
        return report_error(PROG, error)
    failed = [r.name for r in reports if not r.ok]
    print(f"lab-check: {len(reports) - len(failed)}/{len(reports)} notebooks passed in "
          f"{time.monotonic() - started:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
