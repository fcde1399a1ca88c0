"""`gigatron report RUN_DIR` renders in a real headless browser (Debian's chromium): no console
errors, the page's own script runs and counts every plot, and the screenshot (saved in the test's
temporary directory) is not blank and shows the plots' colours. Install on Debian:
    apt-get update && apt-get install -y --no-install-recommends chromium"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from gigatron.cluster.monitor.cli import main
from gigatron.cluster.monitor.report import _heat_color, build_report
from tests.cluster.monitor_fixtures import simulated_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium: apt-get install -y --no-install-recommends "
                                                          "chromium")


def render(html_path: str, png: str, profile: str) -> str:
    """Screenshot the page; return chromium's log (console messages included)."""
    done = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1300,2600",
                           "--enable-logging=stderr", "--v=0", f"--screenshot={png}", "file://" + html_path],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def colour_present(pixels, rgb, tolerance=40) -> int:
    """Pixels within `tolerance` of `rgb` in every channel."""
    import numpy as np

    return int((np.abs(pixels.astype(int) - np.array(rgb)) <= tolerance).all(axis=-1).sum())


def test_report_renders_in_chromium(tmp_path, capsys):
    from PIL import Image

    run = str(tmp_path / "run")
    params = simulated_run(run, steps=120)
    out = str(tmp_path / "report.html")
    assert main(["report", run, "--out", out]) == 0
    capsys.readouterr()
    page = open(out, encoding="utf-8").read()
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    plots = page.count('<svg class="plot')
    assert plots == 7  # loss, throughput, MFU, memory, step time, per-rank heat map, pipeline timeline
    png = str(tmp_path / "report.png")
    log = render(out, png, str(tmp_path / "profile"))
    console = [line for line in log.splitlines() if "CONSOLE" in line]
    print("\n".join(console))
    assert any(f"gigatron-report: {plots} plots rendered" in line for line in console), log[-2000:]
    errors = [line for line in log.splitlines() if re.search(r"Uncaught|ERROR:CONSOLE|SyntaxError", line)]
    assert not errors, errors
    import numpy as np

    image = Image.open(png).convert("RGB")
    assert image.size == (1300, 2600)
    pixels = np.asarray(image)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    background = colour_present(pixels, (250, 250, 250), 0) + colour_present(pixels, (255, 255, 255), 0)
    share = 1 - background / (1300 * 2600)
    print(f"screenshot {png}: {colours} colours, {share:.1%} non-background")
    assert colours > 50 and share > 0.03  # not blank
    # the heat map colours the slow rank by its generated slowdown over the step's median
    slow = tuple(int(v) for v in re.findall(r"\d+", _heat_color(params["slow_factor"])))
    for name, rgb in (("loss line", (0x1F, 0x77, 0xB4)), ("throughput line", (0xFF, 0x7F, 0x0E)),
                      ("straggler cells", slow), ("pipeline forward bars", (0x4C, 0x9B, 0xE8))):
        assert colour_present(pixels, rgb, tolerance=12) > 30, name


def test_report_of_a_half_written_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0, "time": 1.0}\n{"step": 2, "lo')
    page = build_report(str(run))
    assert page.count('<svg class="plot') == 1 and "not logged by this run" in page
    assert main(["report", str(tmp_path / "missing")]) == 2
