"""The demo's verdict and its printed summary, computed from the demo document alone.

The document is what `ptmig demo --json` writes: `{"migration": <final query-migrate of the
source>, "load": <load client result>, "guest": <x-query-guest-stats of the destination>,
"devices": <x-query-devices before the migration and at the end>, "demo": <timeline, options,
outages, throughput>}`. `verdict()` decides the exit status;
`summary_lines()` is the text: QEMU's `info migrate` layout first, then what the load saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..cliconv import CANNOT_RUN, FAILED, OK

EXIT_VERIFIED, EXIT_NOT_VERIFIED, EXIT_DEMO_FAILED = OK, FAILED, CANNOT_RUN


@dataclass
class Verdict:
    ok: bool
    problems: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return EXIT_VERIFIED if self.ok else EXIT_NOT_VERIFIED


def coverage_problems(demo: Mapping[str, Any]) -> list[str]:
    """What the load failed to show about the switchover: the client must have been served
    before the migration, during pre-copy and after the switchover, and its outage at the
    switchover must be a measured gap that contains the guest's pause."""
    tp = demo.get("throughput") or {}
    phases = {p.get("name"): p for p in demo.get("phases") or [] if isinstance(p, Mapping)}
    problems: list[str] = []
    for key, when in (
        ("before", "before the migration"),
        ("pre-copy", "during pre-copy"),
        ("after", "after the switchover"),
    ):
        rate = tp.get(key)
        if not isinstance(rate, (int, float)) or rate <= 0:
            problems.append(f"the client was not served {when} (kv ops/s {key}: {rate})")
    after = phases.get("after")
    if after is None or float(after["end_s"]) <= float(after["start_s"]):
        problems.append(f"the load ended before the switchover: no 'after' phase ({after})")
    gap = (demo.get("outage") or {}).get("client-switchover")
    stop = phases.get("stop-and-copy")
    if not isinstance(gap, Mapping) or "ms" not in gap:
        problems.append(
            "no gap in the client's replies overlaps the switchover "
            f"({_window(stop)}): its outage there was not measured"
        )
    elif not gap.get("contains-switchover"):
        if "last-reply-sent_s" in gap:
            begin = (
                f"the reply that began it answered a request sent at "
                f"{gap['last-reply-sent_s']} s, which must be no later than "
                f"{gap.get('quiesce-ms')} ms after the pause began"
            )
        else:
            begin = f"the outage may begin {gap.get('early-ms')} ms after the pause began"
        problems.append(
            f"the client's outage at the switchover ({gap.get('start_s')} s to "
            f"{gap.get('end_s')} s) does not contain the guest's pause "
            f"({_window(stop)}; {begin} and end {gap.get('late-ms')} ms before the downtime "
            f"ended, ± {gap.get('slack-ms')} ms)"
        )
    return problems


def _window(p: Mapping[str, Any] | None) -> str:
    return "no stop-and-copy" if p is None else f"{p.get('start_s')} s to {p.get('end_s')} s"


def verdict(doc: Mapping[str, Any]) -> Verdict:
    """Everything verified: the migration completed, every page matched, no value was lost,
    and the load spanned the switchover (`coverage_problems`)."""
    mig, load = doc.get("migration") or {}, doc.get("load") or {}
    problems: list[str] = []
    status = mig.get("status")
    if status != "completed":
        problems.append(
            f"migration status is {status!r}, not 'completed'"
            + (f": {mig['error-desc']}" if mig.get("error-desc") else "")
        )
    ver = mig.get("x-verify")
    if not isinstance(ver, Mapping):
        problems.append("no x-verify result: page-by-page verification did not run")
    elif "mismatched" not in ver:
        problems.append(f"page-by-page verification did not conclude: {ver.get('error', ver)}")
    elif ver.get("mismatched", 0):
        problems.append(
            f"{ver['mismatched']} of {ver.get('pages')} pages differ between "
            f"source and destination (first: {ver.get('first-mismatched')})"
        )
    if not load:
        problems.append("the load client produced no result")
    else:
        if load.get("lost") or load.get("wrong"):
            problems.append(
                f"{load.get('lost')} acknowledged values lost and "
                f"{load.get('wrong')} wrong after the migration"
            )
        if load.get("unverified"):
            problems.append(f"{load['unverified']} acknowledged values could not be read back")
        if not load.get("acked"):
            problems.append("the guest acknowledged no value: nothing was proven")
    if status == "completed":
        problems += coverage_problems(doc.get("demo") or {})
    return Verdict(not problems, problems)


def _kib(n: Any) -> str:
    return f"{int(n or 0) // 1024} kbytes"


def migration_lines(mig: Mapping[str, Any]) -> list[str]:
    """QEMU's `info migrate`, field for field, then ptmig's x- additions."""
    ram = mig.get("ram") or {}
    lines = [f"Migration status: {mig.get('status')}"]
    if "total-time" in mig:
        lines.append(f"total time: {mig['total-time']} ms")
    if "downtime" in mig:
        lines.append(f"downtime: {mig['downtime']} ms")
    elif "expected-downtime" in mig:
        lines.append(f"expected downtime: {mig['expected-downtime']} ms")
    if "setup-time" in mig:
        lines.append(f"setup: {mig['setup-time']} ms")
    if ram:
        lines += [
            f"transferred ram: {_kib(ram.get('transferred'))}",
            f"throughput: {float(ram.get('mbps', 0)):.2f} mbps",
            f"remaining ram: {_kib(ram.get('remaining'))}",
            f"total ram: {_kib(ram.get('total'))}",
            f"duplicate: {ram.get('duplicate', 0)} pages",
            f"normal: {ram.get('normal', 0)} pages",
            f"normal bytes: {_kib(ram.get('normal-bytes'))}",
            f"dirty sync count: {ram.get('dirty-sync-count', 0)}",
            f"dirty pages rate: {ram.get('dirty-pages-rate', 0)} pages",
        ]
    if mig.get("cpu-throttle-percentage"):
        lines.append(f"cpu throttle percentage: {mig['cpu-throttle-percentage']}")
    if "error-desc" in mig:
        lines.append(f"error: {mig['error-desc']}")
    lines.append(f"x-dma-tracking: {mig.get('x-dma-tracking')}")
    if mig.get("x-forced-switchover"):
        lines.append(
            "x-forced-switchover: yes (pre-copy stopped converging; the downtime was not "
            "held to downtime-limit)"
        )
    rounds = mig.get("x-rounds") or []
    if rounds:
        parts = [f"{r.get('pages')}" + ("*" if r.get("stop-and-copy") else "") for r in rounds]
        lines.append(f"x-rounds (pages sent; * = stop-and-copy): {' '.join(parts)}")
    ver = mig.get("x-verify")
    if isinstance(ver, Mapping):
        lines.append(
            f"x-verify: {ver.get('pages')} pages compared, {ver.get('mismatched')} mismatched"
        )
    sh = mig.get("x-shadow")
    if isinstance(sh, Mapping):
        lines.append(
            f"x-shadow: {sh.get('requests-forwarded', 0)} DMA work requests "
            f"intercepted, {sh.get('completions-synced', 0)} completions copied back, "
            f"{sh.get('shadowed-pages-peak', 0)} device-buffer pages at peak"
        )
    return lines


def _ms(v: Any) -> str:
    return f"{float(v):.0f} ms" if isinstance(v, (int, float)) else "n/a"


def _rate(v: Any) -> str:
    return f"{float(v):,.0f} ops/s" if isinstance(v, (int, float)) else "n/a"


def _lat(v: Any) -> str:
    if not isinstance(v, Mapping):
        return "n/a"
    return (
        f"p50 {float(v['p50_ms']):.2f} / p99 {float(v['p99_ms']):.2f} / "
        f"max {float(v['max_ms']):.1f} ms"
    )


def _outage_line(outage: Mapping[str, Any]) -> str:
    gap = outage.get("client-switchover")
    longest = (
        f"; longest gap anywhere {_ms(outage.get('client-longest-ms'))} at "
        f"t={float(outage.get('client-longest-at-s') or 0):.2f} s"
    )
    if not isinstance(gap, Mapping) or "ms" not in gap:
        return "outage seen by the client at the switchover: not measured" + longest
    where = "contains" if gap.get("contains-switchover") else "does NOT contain"
    stale = gap.get("stale-replies-inside")
    late = (
        f"; it spans {stale} stale {'reply' if stale == 1 else 'replies'} (to requests sent "
        "before the pause, read inside it)"
        if stale
        else ""
    )
    return (
        f"outage seen by the client at the switchover: {_ms(gap['ms'])} "
        f"(t={float(gap['start_s']):.3f}..{float(gap['end_s']):.3f} s, {where} the "
        f"guest's pause{late})" + longest
    )


def _cpu_line(c: Mapping[str, Any]) -> str | None:
    if not any(k in c for k in ("source-s", "destination-s", "source-with-verify-s")):
        return None

    def side(name: str) -> str:
        if f"{name}-s" not in c:
            return f"{name} n/a (the switchover was not seen between two polls)"
        per = c.get(f"{name}-s-per-gib")
        base = c.get(f"{name}-baseline-s")
        return (
            f"{name} {float(c.get(f'{name}-s', 0)):.2f} s"
            + (f" ({float(per):.2f} s/GiB)" if isinstance(per, (int, float)) else "")
            + (
                f" [{float(base):.2f} s at its warm-up rate]"
                if isinstance(base, (int, float))
                else ""
            )
        )

    verify = ", ".join(
        f"{name} {float(c[f'{name}-with-verify-s']):.2f} s"
        for name in ("source", "destination")
        if f"{name}-with-verify-s" in c
    )
    return (
        f"VMM CPU from migrate to the switchover (vCPU threads left out): "
        f"{side('source')}, {side('destination')}, for "
        f"{float(c.get('gib-transferred', 0)):.3f} GiB sent"
        + (f"; with the verification after it: {verify}" if verify else "")
    )


def load_lines(doc: Mapping[str, Any]) -> list[str]:
    load, demo = doc.get("load") or {}, doc.get("demo") or {}
    mig = doc.get("migration") or {}
    outage = demo.get("outage") or {}
    tp = demo.get("throughput") or {}
    lat = demo.get("latency") or {}
    ver_raw = mig.get("x-verify")
    ver: Mapping[str, Any] = ver_raw if isinstance(ver_raw, Mapping) else {}
    before = outage.get("guest-before-ms")
    lines = [
        _outage_line(outage),
        f"outage seen by the guest:  {_ms(outage.get('guest-ms'))} "
        f"(its longest pause, by its own TSC; {_ms(before)} before the migration)",
        f"kv throughput: before {_rate(tp.get('before'))}, during pre-copy "
        f"{_rate(tp.get('pre-copy'))}, after the switchover {_rate(tp.get('after'))}",
        f"kv latency: before {_lat(lat.get('before'))}; pre-copy {_lat(lat.get('pre-copy'))}; "
        f"after {_lat(lat.get('after'))}",
        f"acknowledged PUTs: {load.get('acked', 0)}, read back: {load.get('verified', 0)}, "
        f"lost: {load.get('lost', 0)}, wrong: {load.get('wrong', 0)}",
        f"mismatched pages: {ver.get('mismatched', 'n/a')} of {ver.get('pages', 'n/a')}",
    ]
    over = _over_limit_line(mig, demo)
    if over:
        lines.insert(0, over)
    kv = (doc.get("guest") or {}).get("kv")
    if isinstance(kv, Mapping) and kv.get("checkpoints"):
        lines.insert(
            3 if over else 2,
            f"  of which the guest's own: {kv['checkpoints']} log checkpoint(s), the longest "
            f"{_ms(kv.get('checkpoint-max-ms'))} (its kv loop serves nothing while it "
            f"rewrites its live keys into the other log area; not the migration's doing)",
        )
    cpu_line = _cpu_line(demo.get("cpu") or {})
    return lines + ([cpu_line] if cpu_line else [])


def _over_limit_line(mig: Mapping[str, Any], demo: Mapping[str, Any]) -> str | None:
    """Say so when the downtime exceeded the limit the demo asked for (a forced switchover)."""
    limit = (demo.get("options") or {}).get("downtime-limit-ms")
    down = mig.get("downtime")
    if not isinstance(limit, (int, float)) or not isinstance(down, (int, float)):
        return None
    if down <= limit:
        return None
    why = (
        "pre-copy stopped converging and the source forced the switchover"
        if mig.get("x-forced-switchover")
        else "the last round took longer than its estimate"
    )
    hint = "a paced --rate or a larger --max-bandwidth"
    if not (demo.get("options") or {}).get("auto-converge"):
        hint = "--auto-converge, " + hint
    return (
        f"downtime {down} ms is OVER the {limit} ms limit: {why} (the guest dirtied memory "
        f"faster than the link carried it; try {hint})"
    )


WHY = {
    "shadow": "The NIC and the disk DMA straight into guest RAM, where KVM's dirty log cannot "
    "see them. While migrating, ptmig gave each device a copy of its DMA buffers and "
    "copied every completion back itself, so every device write was marked dirty and "
    "re-sent.",
    "intercept": "The NIC and the disk DMA straight into guest RAM, where KVM's dirty log "
    "cannot see them. While migrating, ptmig shadowed only their rings: it saw every request "
    "and every completion before the guest did and marked every page a completed request "
    "let the device write dirty, so those pages were re-sent; no data was copied.",
    "none": "The NIC and the disk DMA straight into guest RAM, where KVM's dirty log cannot "
    "see them. Nothing tracked those writes, so pages they changed after being sent "
    "reached the destination stale (in ptmig's runs: the NIC's receive buffers and the "
    "used rings of its receive and transmit queues): this is what passthrough "
    "migration gets wrong.",
    "all-dirty": "Every device-writable page was treated as dirty in every round (QEMU's "
    "fallback): correct, but the whole mapped RAM is re-sent at stop-and-copy.",
    "device-log": "The devices logged their own DMA writes (hardware dirty tracking): correct, "
    "but it needs devices or an IOMMU that can do it.",
}


def summary_lines(doc: Mapping[str, Any]) -> list[str]:
    mig = doc.get("migration") or {}
    v = verdict(doc)
    lines = migration_lines(mig) + [""] + load_lines(doc) + [""]
    why = WHY.get(str(mig.get("x-dma-tracking")))
    if why:
        lines += [why, ""]
    if v.ok:
        lines.append("VERIFIED: migrated under load, 0 values lost, 0 pages mismatched.")
    else:
        lines.append("NOT VERIFIED:")
        lines += [f"  - {p}" for p in v.problems]
    return lines
