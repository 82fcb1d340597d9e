"""The scale bench's migration on real KVM: what the bench sends the VMMs is what they accept.

The section's table is only as good as the migration behind it; a renamed parameter or a
missing flag makes the VMM refuse it, which nothing but a real run notices.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ptmig.bench.scale import MiB, scale_migration

pytestmark = pytest.mark.kvm


def test_one_verified_scale_migration_reports_every_column(tmp_path: Path) -> None:
    memory = 64 * MiB
    s = scale_migration(tmp_path, memory, verify=True)  # raises if a page mismatched
    assert s.memory == memory
    assert s.total_ms > 0 and s.downtime_ms >= 0
    assert s.transferred >= memory - 16 * MiB  # the filled part travelled as data
    assert s.harvest_ms and all(h >= 0 for h in s.harvest_ms)
    # round 0 sends all of RAM, the filled part written by the VMM (not in KVM's log) and the
    # firmware's pages the guest wrote: the latter were re-armed before being read
    assert len(s.rearm_ms) == len(s.harvest_ms) and s.rearm_ms[0] > 0
    assert s.verify_ms > 0
    # x-query-memory measured both VMM processes after the migration
    assert s.src_vmm > 0 and s.dst_vmm > 0
