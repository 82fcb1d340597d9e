"""`python -m ptmig.report OUT_DIR [--demo FILE] [--bench FILE]`: the report from stored JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import write_report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ptmig.report", description=__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--demo", type=Path, help="what `ptmig demo --json` wrote")
    p.add_argument("--bench", type=Path, help="what `ptmig bench` wrote")
    args = p.parse_args(argv)
    try:
        demo = json.loads(args.demo.read_text()) if args.demo else None
        bench = json.loads(args.bench.read_text()) if args.bench else None
        page = write_report(args.out_dir, demo=demo, bench=bench)
    except (OSError, ValueError) as e:
        print(f"ptmig report: {e}", file=sys.stderr)
        return 2
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
