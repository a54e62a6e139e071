"""Notebooks in a real browser: JupyterLab, headless Chromium, a click on every control panel's Run.

For each notebook the test starts JupyterLab on loopback over a copy of its folder (so running it never
rewrites the committed file), with its own Jupyter config, data, runtime and settings folders, opens the
notebook in Debian's Chromium through Playwright, runs all cells, then clicks each control panel's "Run"
button in turn and waits for a new image (a PNG ``<img>``) in that panel's Output area. A screenshot goes
to ``out/browser/<notebook>.png`` whether the test passes or fails.

Environment:

- ``WORKBENCH_BROWSER_NOTEBOOK``: one notebook to drive instead of :data:`NOTEBOOKS` (any notebook, with
  any number of panels); its folder is what gets copied.
- ``WORKBENCH_CHROMIUM``: the Chromium binary (default ``/usr/bin/chromium``).
- ``CI=true``: a missing Chromium or Playwright fails the test instead of skipping it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
#: The notebooks the suite drives: the quickstart, and the two whose panels read saved results or run
#: several analyses (07: the attack table; 08: three panels).
NOTEBOOKS = [REPO / "notebooks" / name for name in
             ("01_quickstart.ipynb", "07_does_it_come_back.ipynb", "08_where_concepts_live.ipynb")]
if os.environ.get("WORKBENCH_BROWSER_NOTEBOOK"):
    NOTEBOOKS = [Path(os.environ["WORKBENCH_BROWSER_NOTEBOOK"]).resolve()]
CHROMIUM = Path(os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = REPO / "out" / "browser"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Seconds, generous: on a busy 2-core CPU running the whole notebook can take several minutes.
SERVER_START = 120
PAGE_LOAD = 180
RUN_ALL = 900
CLICK_RESULT = 420

IN_CI = os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing(what: str) -> None:
    """A missing browser dependency fails in CI and skips elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true, so this fails instead of skipping; `.ci/run` installs it)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


class Lab:
    """A JupyterLab server on 127.0.0.1 over ``root``, isolated from the user's Jupyter set-up."""

    def __init__(self, root: Path, home: Path):
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.log_path = home / "jupyterlab.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "IPYTHON"))}
        env.pop("MPLBACKEND", None)  # the kernel's own (inline) backend is what shows figures
        env.update(
            JUPYTER_CONFIG_DIR=str(home / "config"),
            JUPYTER_DATA_DIR=str(home / "data"),
            JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(home / "lab-settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(home / "lab-workspaces"),
            IPYTHONDIR=str(home / "ipython"),
            JUPYTER_PLATFORM_DIRS="0",
            JUPYTER_PREFER_ENV_PATH="0",  # the folders above come before the virtualenv's
            PYTHONUNBUFFERED="1",
        )
        # "python3" (the notebooks' kernel) is this interpreter: a user-level spec wins over any other.
        write_json(home / "data" / "kernels" / "python3" / "kernel.json", {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)", "language": "python",
            "metadata": {"debugger": True},
        })
        settings = home / "lab-settings"
        # no news / update prompt, no toasts over the page, every cell in the DOM
        write_json(settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
                   {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True})
        write_json(settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
                   {"windowingMode": "none"})
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab",
             "--no-browser", "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
             "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--ServerApp.terminals_enabled=False"]
            + (["--allow-root"] if os.geteuid() == 0 else []),
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(self.url(path), timeout=5) as r:
            return json.load(r)

    def log_tail(self, n: int = 40) -> str:
        self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("/api/status")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"jupyter lab did not answer on {self.base} in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the server shuts its kernels down and exits
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(params=NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def notebook(request) -> Path:
    path = request.param
    if not path.is_file():
        pytest.fail(f"no notebook at {path} (WORKBENCH_BROWSER_NOTEBOOK names the one to drive)")
    return path


@pytest.fixture
def chromium() -> Path:
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing(f"Chromium not found at {CHROMIUM}: `apt-get install chromium` "
                "(or point WORKBENCH_CHROMIUM at a Chromium binary)")
    return CHROMIUM


@pytest.fixture
def playwright_api():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Python Playwright is not installed: `pip install -e '.[test]'`")
    with sync_playwright() as p:
        yield p


@pytest.fixture
def lab(notebook, tmp_path):
    root = tmp_path / "notebooks"
    shutil.copytree(notebook.parent, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    server = Lab(root, tmp_path / "jupyter")
    try:
        server.wait_ready(SERVER_START)
        specs = server.api("/api/kernelspecs")
        argv = specs["kernelspecs"]["python3"]["spec"]["argv"]
        assert argv[0] == sys.executable, f"python3 kernel runs {argv[0]}, not {sys.executable}"
        yield server
    finally:
        server.stop()


# The page is driven through JupyterLab's own app object (``--LabApp.expose_app_in_browser``).
RUN_ALL_JS = """() => {
  window.__wbRunAll = undefined;
  window.jupyterapp.commands.execute('notebook:run-all-cells').then(
    ok => { window.__wbRunAll = {ok: ok}; },
    err => { window.__wbRunAll = {ok: false, error: String(err)}; });
}"""

NOTEBOOK_READY_JS = """(name) => {
  const app = window.jupyterapp;
  const w = app && app.shell && app.shell.currentWidget;
  if (!w || !w.context || !w.context.path.endsWith(name) || !w.sessionContext) return false;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  return Boolean(kernel) && kernel.status === 'idle' && kernel.connectionStatus === 'connected';
}"""

CELL_ERRORS_JS = """() => {
  const nb = window.jupyterapp.shell.currentWidget.content;
  const errors = [];
  for (const cell of nb.widgets) {
    if (cell.model.type !== 'code') continue;
    const outputs = cell.model.outputs;
    for (let i = 0; i < outputs.length; i++) {
      const o = outputs.get(i).toJSON();
      if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue);
    }
  }
  return errors;
}"""

RUNNING_CELL_JS = """() => {
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
  const cell = cells.find(c => (c.querySelector('.jp-InputPrompt') || {}).textContent === '[*]:');
  return cell ? (cell.querySelector('.jp-InputArea-editor') || cell).textContent.slice(0, 200) : null;
}"""

# An <img> with a PNG data URL inside an ipywidgets Output area, decoded, and not marked as seen before.
NEW_PNG = ".widget-output img[src^='data:image/png']:not([data-wb-seen])"
PNG = ".widget-output img[src^='data:image/png']"


def test_each_run_button_of_a_notebook_draws_a_new_image(notebook, chromium, playwright_api, lab):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{notebook.stem}.png"
    browser = playwright_api.chromium.launch(executable_path=str(chromium), headless=True,
                                             args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.set_default_timeout(60_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    t0 = time.monotonic()
    try:
        page.goto(lab.url(f"/lab/tree/{notebook.name}"), timeout=PAGE_LOAD * 1000)
        page.wait_for_function(NOTEBOOK_READY_JS, arg=notebook.name, timeout=PAGE_LOAD * 1000,
                               polling=500)
        t_open = time.monotonic()

        page.evaluate(RUN_ALL_JS)
        try:
            page.wait_for_function("() => window.__wbRunAll !== undefined", timeout=RUN_ALL * 1000,
                                   polling=1000)
        except Exception:
            pytest.fail(f"running all cells of {notebook.name} did not finish in {RUN_ALL} s; still running: "
                        f"{page.evaluate(RUNNING_CELL_JS)!r}")
        result = page.evaluate("() => window.__wbRunAll")
        errors = page.evaluate(CELL_ERRORS_JS)
        assert result["ok"] and not errors, (
            f"running all cells of {notebook.name} failed: {result.get('error', '')} {errors}\n"
            f"server log:\n{lab.log_tail()}")
        t_run_all = time.monotonic()

        button = page.locator("button.widget-button").filter(has_text=re.compile(r"^\s*Run\s*$"))
        panels = page.locator(".jp-Notebook .jp-Cell").filter(has=button)
        assert panels.count() >= 1, f"no widget button 'Run' in {notebook.name}"
        clicks = [click_run(page, panels.nth(i), button, notebook.name, i) for i in range(panels.count())]
        assert not problems, "\n".join(problems)
        print(f"\n{notebook.name}: opened + kernel idle {t_open - t0:.1f} s, run all {t_run_all - t_open:.1f} s; "
              + "; ".join(f"panel {i + 1}: click -> new image {seconds:.1f} s (PNG images before {before}, after "
                          f"{after}; {w}x{h})" for i, (seconds, before, after, (w, h)) in enumerate(clicks)))
    finally:
        try:
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
        except Exception as e:  # the screenshot is a by-product; the test's own failure says more
            print(f"no screenshot ({e})")
        browser.close()


def click_run(page, cell, button, name: str, i: int) -> tuple[float, int, int, list[int]]:
    """Click the Run ``button`` of the panel in ``cell`` and wait for a new PNG image in its Output area
    and for the run to end: the seconds to the new image, the images before and after, and its size."""
    t0 = time.monotonic()
    run = cell.locator(button)
    assert run.count() == 1, f"cell {i + 1} with a panel in {name} has {run.count()} 'Run' buttons"
    run.scroll_into_view_if_needed()
    # whatever the panel's Output area shows now is marked; the click must bring a new image
    before = cell.locator(PNG).evaluate_all(
        "imgs => imgs.map(i => { i.setAttribute('data-wb-seen', ''); return i; }).length")
    run.click()
    new = cell.locator(NEW_PNG).first
    try:
        new.wait_for(state="visible", timeout=CLICK_RESULT * 1000)
    except Exception as e:
        pytest.fail(f"clicking panel {i + 1}'s 'Run' in {name} put no new PNG image in its Output area within "
                    f"{CLICK_RESULT} s ({before} image(s) there before the click): {e}")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=new.element_handle(),
                           timeout=30_000)
    seconds = time.monotonic() - t0
    # the panel disables its button while it runs: wait for the whole run, then show the panel
    page.wait_for_function("b => !b.disabled", arg=run.element_handle(), timeout=CLICK_RESULT * 1000)
    page.wait_for_timeout(500)
    run.evaluate("b => b.scrollIntoView({block: 'start'})")
    size = new.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert min(size) >= 32, f"panel {i + 1}'s new image in {name} is only {size[0]}x{size[1]} pixels"
    return seconds, before, cell.locator(PNG).count(), size
