"""The HTML evaluation report: built from a stored demo document (a real `ptmig demo --json`
run) and a bench document, then opened in a real headless browser to prove the plots render."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ptmig.report import write_report
from ptmig.report.bench import BenchDocError, bandwidth_points, parse_ram, strategy_points

HERE = Path(__file__).resolve().parent
DEMO_DOC = HERE / "test_report_demo.json"


def _strategy_row(name: str, value: float, unit: str) -> dict:
    return {
        "section": "strategies",
        "name": name,
        "value": value,
        "unit": unit,
        "goal": None,
        "ok": None,
        "min": 1,
        "max": 2,
        "runs": [1, 2],
        "extra": {},
    }


def bench_doc() -> dict:
    """A bench document in `ptmig bench`'s format with a strategy comparison."""
    results = []
    for strategy, base_ms, per_gib_ms in (
        ("shadow", 20, 2),
        ("all-dirty", 30, 400),
        ("device-log", 18, 1),
    ):
        for ram, gib in (("256M", 0.25), ("1G", 1.0), ("2G", 2.0)):
            name = f"strategy.{strategy}.{ram}"
            results.append(_strategy_row(f"{name}.downtime", base_ms + per_gib_ms * gib, "ms"))
            sent = 10 + gib * (300 if strategy == "all-dirty" else 5)
            results.append(_strategy_row(f"{name}.bytes", sent, "MiB"))
    for strategy, ratio, cpu in (("none", 2.2, 0.8), ("shadow", 2.6, 1.5)):
        for bw in (400, 100, 200):  # (not in order: the points are sorted)
            name = f"bandwidth.{strategy}.{bw}MiBps"
            results.append(_strategy_row(f"{name}.p99_ratio", ratio * (bw / 100) ** 0.2, "ratio"))
            results.append(_strategy_row(f"{name}.cpu_source", cpu * 100 / bw, "s/GiB"))
            results.append(_strategy_row(f"{name}.cpu_destination", 0.8 * 100 / bw, "s/GiB"))
            results.append(_strategy_row(f"{name}.bytes", 900 * 100 / bw, "MiB"))
    results.append(
        {
            "section": "core",
            "name": "exit.roundtrip",
            "value": 21.5,
            "unit": "µs",
            "goal": "≤ 30 µs",
            "ok": True,
            "min": 20,
            "max": 23,
            "runs": [20, 21.5, 23],
            "extra": {},
        }
    )
    return {
        "format": 1,
        "machine": {"cpu": "test cpu <x86>", "cores": 2},
        "results": results,
        "errors": [],
    }


def test_strategy_points_are_grouped_by_strategy_and_sorted_by_ram() -> None:
    pts = strategy_points(bench_doc())
    assert set(pts) == {"shadow", "all-dirty", "device-log"}
    ad = pts["all-dirty"]
    assert [p.ram_bytes for p in ad] == [256 << 20, 1 << 30, 2 << 30]
    assert ad[1].downtime_ms == 430
    assert ad[1].bytes_sent == 310 * (1 << 20)


def test_bandwidth_points_are_grouped_by_strategy_and_sorted_by_bandwidth() -> None:
    pts = bandwidth_points(bench_doc())
    assert list(pts) == ["none", "shadow"]
    sh = pts["shadow"]
    assert [p.bandwidth_mib for p in sh] == [100.0, 200.0, 400.0]
    assert sh[0].p99_ratio == pytest.approx(2.6) and sh[0].cpu_source == pytest.approx(1.5)
    assert sh[2].cpu_destination == pytest.approx(0.2)
    assert bandwidth_points({"results": []}) == {}
    odd = {"results": [_strategy_row("bandwidth.none.12.5MiBps.p99_ratio", 1.5, "ratio")]}
    assert bandwidth_points(odd)["none"][0].bandwidth_mib == 12.5
    floor = {
        "results": [
            _strategy_row("bandwidth.dirty_log.300ms.p99_ratio", 2.1, "ratio"),
            _strategy_row("bandwidth.dma_tracking.shadow.p99_ratio", 1.8, "ratio"),
        ]
    }
    assert bandwidth_points(floor) == {}  # the floors without a migration are no strategy
    with pytest.raises(BenchDocError, match="'fastMiBps'"):
        bandwidth_points({"results": [_strategy_row("bandwidth.none.fastMiBps.cpu_source", 1, "")]})


def test_bench_doc_errors_say_what_was_wrong() -> None:
    with pytest.raises(BenchDocError, match="'results' list"):
        strategy_points({"format": 1})
    with pytest.raises(BenchDocError, match="'lots'"):
        parse_ram("lots")
    bad = bench_doc()
    bad["results"][1]["unit"] = "furlongs"
    with pytest.raises(BenchDocError, match="furlongs"):
        strategy_points(bad)
    assert parse_ram("1G") == 1 << 30 and parse_ram("512") == 512 << 20


def test_report_page_has_its_plots_and_escapes_values(tmp_path: Path) -> None:
    demo = json.loads(DEMO_DOC.read_text())
    page = write_report(tmp_path, demo=demo, bench=bench_doc())
    text = page.read_text()
    imgs = re.findall(r'<img src="([^"]+)"', text)
    assert imgs == ["timeline.png", "rounds.png", "strategies.png", "bandwidth.png"]
    for name in imgs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test cpu &lt;x86&gt;" in text and "<x86>" not in text
    assert "VERIFIED" in text and "NOT VERIFIED" not in text
    # the demo's phases as measured: pre-copy alone, the outage at the switchover, latency, CPU
    assert "6470 / 1891 / 4814" in text  # kv ops/s before / during pre-copy / after
    assert "2.00 / 6.50 / 20.2 ms" in text  # latency during pre-copy
    assert "1.47 / 0.88 s per GiB sent" in text


def test_report_of_a_failed_verification_says_so(tmp_path: Path) -> None:
    demo = json.loads(DEMO_DOC.read_text())
    demo["migration"]["x-verify"]["mismatched"] = 7
    page = write_report(tmp_path, demo=demo)
    assert "NOT VERIFIED" in page.read_text()
    assert "7 of" in page.read_text()


def test_report_needs_a_document(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a demo document"):
        write_report(tmp_path)


def test_report_command_line(tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(bench_doc()))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ptmig.report",
            str(tmp_path / "r"),
            "--demo",
            str(DEMO_DOC),
            "--bench",
            str(bench),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "index.html").exists()
    assert (tmp_path / "r" / "strategies.png").exists()


CHECK_SCRIPT = """
<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre');
  out.id = 'img-check';
  out.textContent = JSON.stringify(Array.from(document.images).map(
      i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]));
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(
    _chromium() is None, reason="no chromium on this host (`make test` installs it with apt-get)"
)
def test_report_renders_every_plot_in_headless_chromium(tmp_path: Path) -> None:
    demo = json.loads(DEMO_DOC.read_text())
    page = write_report(tmp_path / "report", demo=demo, bench=bench_doc())
    # The page itself carries no script; a copy beside it reports what the browser loaded.
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    common = [
        _chromium() or "",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    out = subprocess.run(
        [*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
    )
    m = re.search(r'<pre id="img-check">(.*?)</pre>', out.stdout, re.S)
    assert m, f"the browser did not run the check (status {out.returncode}):\n{out.stderr[-2000:]}"
    loaded = json.loads(m.group(1).replace("&quot;", '"'))
    assert [src for src, *_ in loaded] == [
        "timeline.png",
        "rounds.png",
        "strategies.png",
        "bandwidth.png",
    ]
    for src, complete, width, height in loaded:
        assert complete and width > 0 and height > 0, (src, complete, width, height)
    shot = tmp_path / "page.png"
    subprocess.run(
        [*common, "--window-size=1100,2400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 10_000
