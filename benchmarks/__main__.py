"""
linkup's upload-throughput suite: ``python -m benchmarks``.

Runs each scenario against a real linkup (processes on free ports, a data dir
of their own) and, under the same load, against a minimal reference relay
(benchmarks/relay.py); simulated masters and workers, in processes of their
own, talk to both over real WebSockets, and every result is checked against
a hash of the file it stands for. Reports tasks/s, MB/s, p50/p99 latency,
peak RSS and CPU of linkup and of the load generator, and linkup's figures
as ratios to the relay's. See docs/performance.md.

    python -m benchmarks                         # everything, a few minutes
    python -m benchmarks --quick                 # everything, small: a check
    python -m benchmarks --scenario dispatch --scenario files-1m

Exits 1 if any result is missing or wrong, or a run failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from benchmarks.report import build_report, table
from benchmarks.runner import run_suite
from benchmarks.scenarios import SCENARIOS, scenario_names

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="scenarios:\n"
        + "\n".join(f"  {s.name:<14}{s.description}" for s in SCENARIOS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=scenario_names(),
        metavar="NAME",
        help="run only this scenario; repeat for several (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every scenario small (under a minute): checks that all complete "
        "correctly; the figures mean little",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "throughput.json",
        help="JSON report (default: benchmarks/results/throughput.json)",
    )
    parser.add_argument(
        "--chart",
        type=Path,
        default=RESULTS / "throughput.png",
        help="PNG chart (default: benchmarks/results/throughput.png)",
    )
    return parser.parse_args(argv)


def _stop(signum: int, frame: FrameType | None) -> None:
    # As Ctrl-C does: every process and directory the run started is cleaned
    # up on the way out (a CI job cancelled, `timeout`, a closed terminal).
    raise KeyboardInterrupt


def _check_writable(path: Path, option: str) -> None:
    # Found out now, not after minutes of measuring.
    if path.is_dir():
        sys.exit(f"python -m benchmarks: {option} {path}: is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        sys.exit(f"python -m benchmarks: {option} {path}: {exc}")
    if not os.access(path.parent, os.W_OK):
        sys.exit(f"python -m benchmarks: {option} {path}: directory not writable")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _check_writable(args.output, "--output")
    _check_writable(args.chart, "--chart")
    if args.chart.suffix.lower() != ".png":
        sys.exit(f"python -m benchmarks: --chart {args.chart}: must end in .png")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    names = args.scenario or scenario_names()
    started_at = datetime.datetime.now().astimezone()
    started = time.monotonic()
    load_before = os.getloadavg()
    try:
        results = run_suite(names, args.quick)
    except KeyboardInterrupt:
        # Everything the run started is stopped and removed by now.
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 130
    report = build_report(
        results, args.quick, started_at, time.monotonic() - started, load_before
    )

    # The figures first: whatever fails after, they are not lost.
    print(table(report))
    try:
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    except OSError as exc:
        print(f"\ncannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    try:
        # Imported here: matplotlib takes a second to load.
        from benchmarks.chart import draw_chart
    except ImportError:
        print(
            f"\nwritten to {args.output}; no chart: matplotlib is missing "
            "(pip install -e '.[bench]')",
            file=sys.stderr,
        )
    else:
        try:
            draw_chart(report, args.chart)
        except OSError as exc:
            print(f"\nwritten to {args.output}; no chart: {exc}", file=sys.stderr)
            return 1
        print(f"\nwritten to {args.output} and {args.chart}", file=sys.stderr)
    if not report["ok"]:
        print("\nFAILED:", file=sys.stderr)
        for error in report["errors"]:
            print(f"  {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
