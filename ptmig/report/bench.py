"""Reading the strategy comparison out of a `ptmig bench` document (see `ptmig.bench`).

The document is `{"format": 1, "machine": {...}, "results": [Result.to_json()...], "errors":
[...], "sections": [{"section", "duration_s", "results", "crashed"}...], "duration_s"}`. The
DMA-tracking strategy comparison reports, for each strategy and guest RAM size, two results
named

    strategy.<strategy>.<ram>.downtime   unit "ms"
    strategy.<strategy>.<ram>.bytes      unit "B", "KiB", "MiB" or "GiB" (bytes sent in all)

where <ram> is a size as in VM configs ("256M", "1G") or a number of MiB. The RAM size may
also be given as `extra["ram_bytes"]`, which wins. Anything else in the document is ignored
here (the report lists every result in its table anyway). Pure: no plotting, no files.

The cost-by-bandwidth section (`ptmig.bench.bandwidth`) reports, per strategy and
`max-bandwidth` N (MiB/s), `bandwidth.<strategy>.<N>MiBps.p99_ratio` (kv p99 during pre-copy
÷ before) and `.cpu_source` / `.cpu_destination` (VMM CPU s per GiB of RAM): `bandwidth_points`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PtmigError

UNIT_BYTES = {"B": 1, "bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class BenchDocError(PtmigError, ValueError):
    """The bench document is not in the format `ptmig bench` writes."""


@dataclass(frozen=True)
class StrategyPoint:
    strategy: str
    ram_bytes: int
    downtime_ms: float | None = None
    bytes_sent: float | None = None


@dataclass(frozen=True)
class BandwidthPoint:
    strategy: str
    bandwidth_mib: float
    p99_ratio: float | None = None
    cpu_source: float | None = None
    cpu_destination: float | None = None


_BANDWIDTH_METRICS = ("p99_ratio", "cpu_source", "cpu_destination")


def parse_ram(text: str) -> int:
    """'256M' / '1G' / '512' (MiB) -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in _SUFFIX:
            return int(float(t[:-1]) * _SUFFIX[t[-1]])
        return int(float(t) * (1 << 20))
    except ValueError:
        raise BenchDocError(
            f"RAM size {text!r} is not like '256M', '1G' or a number of MiB"
        ) from None


def results_of(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    results = doc.get("results")
    if not isinstance(results, list):
        raise BenchDocError(f"a bench document has a 'results' list; got keys {sorted(doc)}")
    return [r for r in results if isinstance(r, Mapping)]


def strategy_points(doc: Mapping[str, Any]) -> dict[str, list[StrategyPoint]]:
    """Strategy name -> its points sorted by RAM size (empty when the section did not run)."""
    cells: dict[tuple[str, int], dict[str, float | None]] = {}
    for r in results_of(doc):
        parts = str(r.get("name", "")).split(".")
        if len(parts) != 4 or parts[0] != "strategy" or parts[3] not in ("downtime", "bytes"):
            continue
        _, strategy, ram_text, what = parts
        extra = r.get("extra") or {}
        ram = (
            int(extra["ram_bytes"])
            if isinstance(extra.get("ram_bytes"), int)
            else parse_ram(ram_text)
        )
        value = r.get("value")
        v = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        if what == "bytes" and v is not None:
            unit = str(r.get("unit", "B"))
            if unit not in UNIT_BYTES:
                raise BenchDocError(
                    f"{r.get('name')}: unit {unit!r} is not one of {', '.join(UNIT_BYTES)}"
                )
            v *= UNIT_BYTES[unit]
        cells.setdefault((strategy, ram), {})[what] = v
    out: dict[str, list[StrategyPoint]] = {}
    for (strategy, ram), vals in sorted(cells.items()):
        out.setdefault(strategy, []).append(
            StrategyPoint(strategy, ram, vals.get("downtime"), vals.get("bytes"))
        )
    return out


def bandwidth_points(doc: Mapping[str, Any]) -> dict[str, list[BandwidthPoint]]:
    """Strategy name -> its points sorted by bandwidth (empty when the section did not run)."""
    cells: dict[tuple[str, float], dict[str, float | None]] = {}
    order: list[str] = []
    for r in results_of(doc):
        parts = str(r.get("name", "")).split(".")
        # (a bandwidth such as 12.5 MiB/s has a dot of its own: the name then has 5 parts)
        if len(parts) < 4 or parts[0] != "bandwidth" or parts[-1] not in _BANDWIDTH_METRICS:
            continue
        if parts[1] in ("dirty_log", "dma_tracking"):  # no migration (`ptmig.bench.dirtylog`)
            continue
        strategy, bw_text, what = parts[1], ".".join(parts[2:-1]), parts[-1]
        try:
            bw = float(bw_text.removesuffix("MiBps"))
        except ValueError:
            raise BenchDocError(f"{r.get('name')}: {bw_text!r} is not like '200MiBps'") from None
        value = r.get("value")
        v = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        if strategy not in order:
            order.append(strategy)
        cells.setdefault((strategy, bw), {})[what] = v
    out: dict[str, list[BandwidthPoint]] = {s: [] for s in order}
    for (strategy, bw), vals in sorted(cells.items(), key=lambda kv: kv[0][1]):
        out[strategy].append(
            BandwidthPoint(
                strategy,
                bw,
                vals.get("p99_ratio"),
                vals.get("cpu_source"),
                vals.get("cpu_destination"),
            )
        )
    return out


def result_rows(doc: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """Every result, for the report's table."""
    return results_of(doc)
