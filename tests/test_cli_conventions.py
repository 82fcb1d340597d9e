"""The command line's conventions (ptmig.cliconv), command by command: exit statuses, errors on
stderr, `--json -`, QEMU's option names and units, `python -m ptmig`, one-line summaries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from ptmig import cliconv
from ptmig.cli import main
from ptmig.cliconv import parse_bandwidth

COMMANDS = ("bench", "demo", "load", "migrate", "run", "switch")


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def python_m(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=60, **kw
    )


def test_python_m_ptmig_is_the_command() -> None:
    out = python_m("ptmig", "--version")
    assert out.returncode == 0 and out.stdout.startswith("ptmig, version"), out
    out = python_m("ptmig", "--help")
    assert out.returncode == 0 and "Usage: ptmig [OPTIONS] COMMAND" in out.stdout, out


def test_help_lists_every_command_on_one_untruncated_line_and_the_exit_statuses() -> None:
    r = cli("--help")
    assert r.exit_code == 0
    lines = {
        line.split()[0]: line
        for line in r.stdout.splitlines()
        if line.startswith("  ") and line.split() and line.split()[0] in COMMANDS
    }
    assert sorted(lines) == sorted(COMMANDS)
    for name, line in lines.items():
        assert not line.rstrip().endswith("..."), f"{name}'s summary is cut: {line!r}"
    for status in (
        "0    success",
        "2    usage error",
        "4    the migration completed",
        "125 when ptmig run itself failed",
    ):
        assert status in r.stdout


@pytest.mark.parametrize("command", ["bench", "demo", "load", "migrate", "switch"])
def test_a_usage_error_is_2_on_stderr(command: str) -> None:
    r = cli(command, "--no-such-option")
    assert r.exit_code == cliconv.USAGE
    assert "No such option" in r.stderr and r.stdout == ""


def test_statuses_are_distinct() -> None:
    codes = [
        cliconv.OK,
        cliconv.FAILED,
        cliconv.USAGE,
        cliconv.CANNOT_RUN,
        cliconv.MISMATCH,
        cliconv.VMM_FAILED,
    ]
    assert len(set(codes)) == len(codes)


def test_ptmig_run_own_failures_are_125_never_a_guest_code(tmp_path: Path) -> None:
    """Usage errors and a bad config (no KVM needed: the config is read first)."""
    r = python_m("ptmig", "run", "--bogus")
    assert r.returncode == cliconv.VMM_FAILED and "No such option" in r.stderr, r
    r = python_m("ptmig", "run", str(tmp_path / "missing.toml"))
    assert r.returncode == cliconv.VMM_FAILED and "does not exist" in r.stderr, r
    bad = tmp_path / "bad.toml"
    bad.write_text("[vm]\nmemory = 12\n")
    r = python_m("ptmig", "run", str(bad))
    assert r.returncode == cliconv.VMM_FAILED and r.stdout == "", r
    assert "memory" in r.stderr and "Traceback" not in r.stderr, r
    hello = str(Path(__file__).resolve().parent.parent / "examples/hello.toml")
    r = python_m("ptmig", "run", hello, "--incoming-timeout", "5")
    assert r.returncode == cliconv.VMM_FAILED and "needs --incoming" in r.stderr, r
    r = python_m("ptmig", "run", hello, "--incoming", "tcp:127.0.0.1:0", "--incoming-timeout", "0")
    assert r.returncode == cliconv.VMM_FAILED and "--incoming-timeout" in r.stderr, r


def test_migrate_without_a_vmm_json_to_stdout_and_error_to_stderr(tmp_path: Path) -> None:
    r = cli("migrate", "--qmp", f"unix:{tmp_path / 'none.sock'}", "tcp:127.0.0.1:1", "--json", "-")
    assert r.exit_code == cliconv.CANNOT_RUN
    assert "cannot connect" in r.stderr and r.stdout == ""


def test_bench_rejects_a_rate_that_is_not_positive_as_a_usage_error() -> None:
    r = cli("bench", "--rate", "0", "--only", "core")
    assert r.exit_code == cliconv.USAGE
    assert "--rate" in r.stderr and r.stdout == ""


def test_bench_rejects_an_unknown_section_as_a_usage_error() -> None:
    r = cli("bench", "--only", "nope")
    assert r.exit_code == cliconv.USAGE
    assert "'nope'" in r.stderr and "known sections" in r.stderr and r.stdout == ""


def _captured_migrate(monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    import ptmig.migrate as client

    seen: list[Any] = []

    def run(opts: Any) -> int:
        seen.append(opts)
        return 0

    monkeypatch.setattr(client, "run", run)
    r = cli("migrate", "--qmp", "unix:/x.sock", "tcp:127.0.0.1:1", *args)
    return r, (client.setup_commands(seen[0]) if seen else None)


def test_migrate_options_use_qemu_names_and_units(monkeypatch: pytest.MonkeyPatch) -> None:
    r, cmds = _captured_migrate(monkeypatch, "--downtime-limit", "30", "--max-bandwidth", "1G")
    assert r.exit_code == 0, r.output
    assert cmds[0] == ("migrate-set-parameters", {"downtime-limit": 30, "max-bandwidth": 1 << 30})
    # the old spelling still works, hidden from --help
    r, cmds = _captured_migrate(monkeypatch, "--downtime-limit-ms", "40")
    assert r.exit_code == 0 and cmds[0][1] == {"downtime-limit": 40}
    assert "--downtime-limit-ms" not in cli("migrate", "--help").stdout
    r, cmds = _captured_migrate(monkeypatch, "--downtime-limit", "1", "--downtime-limit-ms", "2")
    assert r.exit_code == cliconv.USAGE and cmds is None


def test_a_bandwidth_without_its_unit_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r, cmds = _captured_migrate(monkeypatch, "--max-bandwidth", "100")
    assert r.exit_code == cliconv.USAGE and cmds is None
    assert "100 MiB/s is 100M" in r.stderr
    r = cli("demo", "--max-bandwidth", "100")
    assert r.exit_code == cliconv.USAGE and "100 MiB/s is 100M" in r.stderr


@pytest.mark.parametrize(
    "text, value",
    [
        ("0", 0),
        ("4096", 4096),
        ("100M", 100 << 20),
        ("1.5G", 3 << 29),
        ("64k", 64 << 10),
        ("100MiB", 100 << 20),
        ("2 G", 2 << 30),
    ],
)
def test_bandwidth_values(text: str, value: int) -> None:
    assert parse_bandwidth(text) == value


@pytest.mark.parametrize("text", ["", "fast", "-5M", "10T", "1e9", "4095", "1K"])
def test_bad_bandwidth_values(text: str) -> None:
    with pytest.raises(ValueError, match="max-bandwidth"):
        parse_bandwidth(text)


@given(st.integers(min_value=4096, max_value=1 << 40))
def test_any_plain_byte_rate_reads_back(value: int) -> None:
    assert parse_bandwidth(str(value)) == value


def test_write_json_to_a_file_or_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = {"a": [1, 2], "b": "é"}
    cliconv.write_json(doc, tmp_path / "sub" / "d.json")
    assert json.loads((tmp_path / "sub" / "d.json").read_text()) == doc
    cliconv.write_json(doc, "-")
    assert json.loads(capsys.readouterr().out) == doc
    assert not Path("-").exists()
