"""Shadow mode on real KVM with real device processes and the kv guest under load."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ptmig import bitmap
from ptmig.config import load_config
from ptmig.layout import PAGE_SIZE
from ptmig.load import LoadOptions, run_load
from ptmig.machine import Machine
from ptmig.shadow.strategy import ShadowTracking

from kvrig import Vmm, free_port, kv_config, migrate, start_load, wait_migration

pytestmark = pytest.mark.kvm


def _boot(tmp_path: Path) -> tuple[Machine, Path]:
    cfg_path = kv_config(tmp_path, memory="64M")
    m = Machine(load_config(cfg_path))
    m.boot()
    m.vm.start()
    # warm up: ARP resolved, log formatted, the guest serving
    run_load(LoadOptions(config=cfg_path, duration_s=0.5, rate=200, verify=False))
    return m, cfg_path


def _changed_pages(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    rows_b = before.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
    rows_a = after.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
    return np.flatnonzero((rows_b != rows_a).any(axis=1))


def _escaped_pages(tmp_path: Path, shadow: bool) -> tuple[np.ndarray, np.ndarray, Machine]:
    """Pages that changed in guest RAM while the kv guest served load, minus the harvested
    dirty set. Returns (changed, escaped, machine)."""
    m, cfg_path = _boot(tmp_path)
    vm = m.vm
    strategy = ShadowTracking()
    if shadow:
        strategy.begin(m)
    stop = threading.Event()
    results = []

    def load() -> None:
        results.append(run_load(LoadOptions(config=cfg_path, duration_s=3, rate=300,
                                            verify=False)))
        stop.set()

    t = threading.Thread(target=load)
    t.start()
    time.sleep(0.5)
    vm.pause()
    if shadow:
        assert strategy.engine is not None
        with strategy.engine._lock:  # no completion is synced while we snapshot
            vm.dirty.harvest()
            before = vm.memory.array.copy()
    else:
        vm.dirty.harvest()
        before = vm.memory.array.copy()
    vm.resume()
    time.sleep(1.0)
    vm.pause()
    if shadow:
        strategy.stop_and_copy(m)
    else:
        for d in m.devices:
            d.handle.quiesce()
    dirty = bitmap.to_bool(vm.dirty.harvest(), vm.memory.npages)
    after = vm.memory.array.copy()
    changed = _changed_pages(before, after)
    escaped = changed[~dirty[changed]]
    if shadow:
        strategy.abort(m)
    else:
        for d in m.devices:
            d.handle.resume()
    vm.resume()
    t.join()
    return changed, escaped, m


def test_every_page_changed_during_shadowing_is_in_the_dirty_set(tmp_path: Path) -> None:
    changed, escaped, m = _escaped_pages(tmp_path, shadow=True)
    try:
        assert changed.size > 0
        assert escaped.size == 0, f"pages changed behind the dirty log: {escaped[:16]}"
    finally:
        m.close()


def test_without_shadowing_device_writes_escape_the_dirty_set(tmp_path: Path) -> None:
    # The negative control: the same check fails in direct mode, so the test above can fail.
    changed, escaped, m = _escaped_pages(tmp_path, shadow=False)
    try:
        assert escaped.size > 0, "device DMA should be invisible to KVM's log in direct mode"
    finally:
        m.close()
