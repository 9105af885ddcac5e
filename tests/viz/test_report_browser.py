"""The report in a real headless browser: sections render, every image decodes, and a screenshot.

Needs Debian's chromium (``apt-get install chromium``). Set ``CUSA_UPDATE_SCREENSHOT=1`` to
refresh ``docs/img/report.png`` from this run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cusa.viz import build_report

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "report.png"
# Headless flags: without the background-networking ones chromium keeps trying
# (and failing) to reach the network.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"needs headless chromium at {CHROMIUM} (Debian: apt-get install chromium)",
    ),
]

# Injected into a copy of the page only: the report itself carries no script.
_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var loaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var sections = Array.prototype.slice.call(document.querySelectorAll('section[data-section]'))
    .filter(function (s) { return s.offsetHeight > 40; }).map(function (s) { return s.id; });
  var out = document.createElement('pre');
  out.id = 'cusa-probe';
  out.textContent = JSON.stringify({images: imgs.length, loaded: loaded, sections: sections,
                                    height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_report_renders_in_chromium(coco_store, tmp_path):
    page = build_report(coco_store, tmp_path / "report.html", dataset="coco-sample", split="train")
    html = page.read_text(encoding="utf-8")
    assert "<script" not in html
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", _PROBE + "\n</body>"), encoding="utf-8")

    result = _chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path)
    match = re.search(r'<pre id="cusa-probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"the page did not finish loading in chromium: {result.stderr[-2000:]}"
    state = json.loads(match.group(1).replace("&quot;", '"'))
    assert state["sections"] == [
        "summary",
        "soft-labels",
        "false-negatives",
        "neighbours",
        "training",
    ]
    assert state["images"] >= 16 + 3 + 8 + 18  # batch, plots, gallery, image neighbours
    assert state["loaded"] == state["images"], state

    shot = tmp_path / "report.png"
    height = min(int(state["height"]), 3000)
    result = _chromium(
        [f"--screenshot={shot}", f"--window-size=1280,{height}", page.as_uri()], tmp_path
    )
    assert shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, height)
        px = np.asarray(im.convert("RGB"), dtype=np.float32)
    # A rendered page with photos and plots: many colours and real contrast, not a blank canvas.
    assert px.std() > 30
    assert len(np.unique(px[::4, ::4].reshape(-1, 3), axis=0)) > 2000
    if os.environ.get("CUSA_UPDATE_SCREENSHOT") == "1":
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, DOCS_SHOT)
