"""What the source's migration thread checks between sends (`SourceMigration._check`): a
shadowed device that broke ends the migration during pre-copy, at once, not when the round ends
(under a low max-bandwidth a round can take minutes); after pre-copy the strategy's own steps
deal with it. No KVM: the machine is the little the migration reads before it runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ptmig.migration.params import MigrationCapabilities, MigrationParams, Status
from ptmig.migration.source import SourceMigration
from ptmig.shadow.engine import ShadowFailed


class _Engine:
    """A shadow engine as `_check` sees it: `check` raises once a device broke."""

    def __init__(self) -> None:
        self.broken: str | None = None

    def check(self) -> None:
        if self.broken is not None:
            raise ShadowFailed(self.broken)


def _migration() -> tuple[SourceMigration, _Engine]:
    machine = SimpleNamespace(vm=SimpleNamespace(vcpu_thread_ids=lambda: []))
    params = MigrationParams()
    params.x_dma_tracking = "shadow"
    mig = SourceMigration(
        machine,  # type: ignore[arg-type]
        "tcp:127.0.0.1:1",
        params,
        MigrationCapabilities(),
    )
    engine = _Engine()
    mig.strategy.engine = engine  # type: ignore[assignment]
    mig._began = True
    mig.info.status = Status.ACTIVE
    return mig, engine


def test_a_device_that_broke_during_precopy_fails_the_next_check() -> None:
    mig, engine = _migration()
    mig._check()  # healthy: nothing happens
    engine.broken = "disk0: the device is gone"
    with pytest.raises(ShadowFailed, match="disk0: the device is gone"):
        mig._check()


@pytest.mark.parametrize("status", [Status.SETUP, Status.DEVICE, Status.POSTCOPY_ACTIVE])
def test_outside_precopy_a_broken_device_is_left_to_the_strategy(status: Status) -> None:
    """Before the strategy began, in the stop-and-copy (its sync reports a broken device) and
    once the guest runs on the destination (post-copy), the check does not look."""
    mig, engine = _migration()
    engine.broken = "net0: a hostile ring"
    mig.info.status = status
    mig._check()


def test_before_the_strategy_began_nothing_is_asked() -> None:
    mig, engine = _migration()
    engine.broken = "net0: a hostile ring"
    mig._began = False
    mig._check()
