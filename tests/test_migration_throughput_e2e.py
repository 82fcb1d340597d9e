"""A real migration over parallel data channels (two `ptmig run` processes, KVM), verified."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptmig.bench.migration import DATA_CHANNELS, MigrationBenchParams, ptmig_migration

pytestmark = pytest.mark.kvm


def test_data_channels_migrate_a_filled_guest_page_for_page(tmp_path: Path) -> None:
    assert DATA_CHANNELS > 1
    sample = ptmig_migration(tmp_path, MigrationBenchParams(memory=64 << 20), verify=True)
    info = sample.info
    assert info["status"] == "completed"
    assert info["x-verify"]["pages"] == 16384
    assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
    assert info["ram"]["normal"] >= (64 - 16) * 256  # the filled part travelled as data
    # both VMM processes spent some CPU on it (their vCPU threads left out), and it was read
    assert sample.cpu_source_s > 0 and sample.cpu_destination_s > 0
