"""The leaderboard web page: self-contained, escapes the CSV's text, and sorts in a real browser."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from wmbench.leaderboard import normalize, read_results, sort_rows, write_leaderboard
from wmbench.report_html import render_html
from wmbench.results import to_frame

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p), None)
# Clean error per method, not in name order, so sorting by it must reorder the rows.
CLEAN_ERROR = {"alpha": 5.0, "beta": 1.0, "gamma": 3.0}
HOSTILE = '<script>alert("x")</script><img src=https://evil.example/x.png>'


def rows(extra_method: str | None = None) -> list[dict[str, Any]]:
    """3 methods (plus ``extra_method``) x noise at 0 and 0.1 x 3 seeds."""
    out = []
    for method, clean in {**CLEAN_ERROR, **({extra_method: 2.0} if extra_method else {})}.items():
        for strength in (0.0, 0.1):
            for seed in range(3):
                error = clean + 0.1 * seed + 4.0 * strength * 10
                out.append({
                    "scenario": "web", "model": "mlp", "dataset": "digits", "method": method, "seed": seed,
                    "attack": "noise", "strength": strength, "metric": "accuracy", "metric_value": 1 - error / 100,
                    "error": error, "error_clean": clean + 0.1 * seed, "error_delta": error - clean - 0.1 * seed,
                    "error_unwatermarked": 1.0, "detect_stat": 0.9 - strength, "detect_pvalue": 1e-9,
                    "detected": strength == 0, "wmbench_version": "0.1.0", "detect_log10_p": -9.0,
                    "torch_threads": 1, "device": "cpu",
                })
    return out


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("web")
    written = write_leaderboard(to_frame(rows()), out, "web")
    assert out / "web.html" in written
    return out / "web.html"


def test_page_is_self_contained(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"https?://", text)  # no CDN, no remote image, no link out
    sources = re.findall(r'\ssrc="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # the plots, inlined
    assert "default-src 'none'" in text  # and the browser is told to fetch nothing
    assert "mlp / digits" in text and "scenario: web" in text and "wmbench version: 0.1.0" in text


def test_csv_text_is_escaped() -> None:
    text = render_html(normalize(to_frame(rows(extra_method=HOSTILE))), "evil <b>name</b>")
    assert HOSTILE not in text and "<b>name</b>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert len(re.findall(r"<script>", text)) == 1  # the page's own script only


def test_summary_gives_removal_cost_and_cheap_flag(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "removal cost: noise" in text
    # every method loses its mark at 0.1 for +4.00 points of error: not a cheap removal (>= 2)
    assert text.count("+4.00 at 0.1") == len(CLEAN_ERROR)
    assert ">no</td>" in text


def test_old_published_csv_renders(tmp_path: Path) -> None:
    """leaderboard/quickstart.csv predates detect_log10_p, torch_threads and device."""
    frame = read_results(ROOT / "leaderboard" / "quickstart.csv")
    frame = frame[frame["attack"].isin(["key_leak", "noise"])]  # two attacks keep the test quick
    text = render_html(sort_rows(frame), "quickstart")
    assert "small_cnn / digits" in text and "removal cost: key_leak" in text
    assert not re.search(r"https?://", text)


class CDP:
    """Chromium driven over --remote-debugging-pipe (fd 3 in, fd 4 out; NUL-separated JSON)."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]  # out of 3/4's way

        def plumb() -> None:  # in the child, before it closes every fd but 0-2 and pass_fds
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=plumb,
        )
        for fd in (to_child, from_child, *high):
            os.close(fd)
        self._buffer = b""
        self._next = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next:
                    assert "error" not in reply, reply
                    return reply["result"]
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buffer += chunk
        raise TimeoutError(method)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)


def evaluate(cdp: CDP, session: str, expression: str) -> Any:
    result = cdp.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
    assert "exceptionDetails" not in result, result["exceptionDetails"]
    return result["result"].get("value")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_clicking_a_header_sorts_the_table_in_chromium(page: Path, tmp_path: Path) -> None:
    cdp = CDP(CHROMIUM, tmp_path / "profile")
    try:
        target = cdp.send("Target.createTarget", {"url": page.as_uri()})["targetId"]
        session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        loaded = "location.protocol === 'file:' && document.readyState === 'complete'"
        for _ in range(1200):
            if evaluate(cdp, session, loaded):
                break
            time.sleep(0.05)
        table = "document.querySelector('table.sortable')"
        methods = f"Array.from({table}.tBodies[0].rows, r => r.cells[0].textContent)"
        column = f"Array.from({table}.tHead.rows[0].cells).findIndex(c => c.textContent.startsWith('clean error'))"
        before = evaluate(cdp, session, methods)
        assert before == sorted(CLEAN_ERROR)  # rendered in method order
        center = evaluate(cdp, session, f"""(() => {{
            const th = {table}.tHead.rows[0].cells[{column}]; th.scrollIntoView();
            const r = th.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        orders = []
        for _ in range(2):  # a real mouse click on the header, twice: ascending, then descending
            for kind in ("mousePressed", "mouseReleased"):
                cdp.send("Input.dispatchMouseEvent", {"type": kind, "x": center[0], "y": center[1], "button": "left", "clickCount": 1}, session)
            orders.append(evaluate(cdp, session, methods))
        by_error = sorted(CLEAN_ERROR, key=CLEAN_ERROR.get)
        assert orders == [by_error, by_error[::-1]] and orders[0] != before
        assert evaluate(cdp, session, f"{table}.tHead.rows[0].cells[{column}].getAttribute('aria-sort')") == "descending"
    finally:
        cdp.close()
