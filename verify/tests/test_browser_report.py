"""The HTML report in a real browser: headless Chromium (Debian's package) loads the page from a
file, the page's own script finds every figure decoded, nothing reaches the console, and a
screenshot is written beside the report. Marker `browser`: runs where Chromium is installed
(NVFP4V_CHROMIUM or /usr/bin/chromium), skipped with the reason elsewhere."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from verify.plugin import chromium_path
from verify.tests.sweep_runs import baseline_run_dir

pytestmark = pytest.mark.browser

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000"]


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium_path(), *FLAGS, *args], capture_output=True, text=True, timeout=120)


def _load(page: Path) -> tuple[str, list[str]]:
    """(the DOM after the load event, the console lines Chromium logged)."""
    proc = _chromium("--dump-dom", page.resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]


def _body_attr(dom: str, name: str) -> str | None:
    m = re.search(rf'<body[^>]*\s{name}="([^"]*)"', dom)
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """A copy of the baseline sweep: the screenshot is written into this report dir (kept by pytest
    under its basetemp; NVFP4V_REPORT_DIR / --report-dir also gets a copy)."""
    out = tmp_path_factory.mktemp("browser") / "run"
    shutil.copytree(baseline_run_dir(), out)
    return out


def test_the_report_renders_every_plot_without_console_errors(report_dir, run_cfg):
    dom, console = _load(report_dir / "report.html")
    assert not console, "console output while loading the report:\n" + "\n".join(console)
    expected = _body_attr(dom, "data-expected-figures")
    assert expected == "5", dom[:500]
    assert _body_attr(dom, "data-rendered") == "ok" and _body_attr(dom, "data-figures") == expected
    shot = report_dir / "report.png"
    proc = _chromium("--window-size=1400,4200", f"--screenshot={shot}", (report_dir / "report.html").as_uri())
    assert proc.returncode == 0 and shot.stat().st_size > 50_000, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if run_cfg.report_dir:
        run_cfg.report_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, run_cfg.report_dir / "report.png")
        shutil.copy(report_dir / "report.html", run_cfg.report_dir / "report.html")


def test_a_plot_that_does_not_decode_is_caught(report_dir, tmp_path):
    """The check above can fail: one figure's data replaced by bytes that are no image."""
    page = (report_dir / "report.html").read_text()
    broken = re.sub(r'(<img alt="heatmap" src="data:image/svg\+xml;base64,)[^"]*', r"\1AAAA", page, count=1)
    assert broken != page
    (tmp_path / "broken.html").write_text(broken)
    dom, console = _load(tmp_path / "broken.html")
    assert _body_attr(dom, "data-rendered") == "error" and _body_attr(dom, "data-figures") == "4"
    assert any("figures failed to render: heatmap" in ln for ln in console), console
