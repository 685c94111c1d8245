"""Reads one compute-sanitizer run of scripts/sanitize_ops.py on stdin and writes a bounded log: every
line but report bodies past the first few, then a table of the reports counted per (marker, kernel).

A report belongs to the marker line ("sanitize_ops: ...") printed after it: each family and each read
of an op's outputs ends with one, after a device synchronisation. Exit status 0 when the run ended
with a zero error summary, else 1.

    compute-sanitizer --tool initcheck --show-backtrace no python scripts/sanitize_ops.py 2>&1 |
        python scripts/sanitize_report.py --keep 20 > sanitize_initcheck.log
"""

import argparse
import collections
import re
import sys

PREFIX = "========= "
# A report's first line, for each tool (initcheck / memcheck, racecheck, synccheck).
REPORT = re.compile(r"^========= (Uninitialized|Invalid|Error: Race|Warning: Race|Barrier error|Program hit)")
KERNEL = re.compile(r"^=========\s+at (?:void )?(.*?)(?:\+0x[0-9a-f]+)?(?: in .*)?$")
SUMMARY = re.compile(r"(ERROR SUMMARY|RACECHECK SUMMARY): (\d+)")


def short_kernel(name: str, width: int = 160) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=int, default=20, help="report bodies to keep in full")
    args = parser.parse_args()
    counts: collections.Counter = collections.Counter()
    pending: collections.Counter = collections.Counter()  # reports not yet followed by a marker
    reports = kept = 0
    in_report = want_kernel = False
    summary = None
    for line in sys.stdin:
        line = line.rstrip("\n")
        if REPORT.match(line):
            reports += 1
            in_report = want_kernel = True
            kind = line[len(PREFIX) :].split(" of size")[0].split(" at ")[0]
            if kept < args.keep:
                kept += 1
                print(line)
            continue
        if in_report and line.startswith(PREFIX.rstrip()):
            if want_kernel and (match := KERNEL.match(line)):
                pending[(kind, short_kernel(match.group(1)))] += 1
                want_kernel = False
            if kept <= args.keep and reports == kept:
                print(line)
            continue
        if in_report and want_kernel:  # a report without a kernel frame
            pending[(kind, "?")] += 1
        in_report = want_kernel = False
        if match := SUMMARY.search(line):
            summary = int(match.group(2))
        if line.startswith("sanitize_ops: "):
            marker = line.removeprefix("sanitize_ops: ")
            for key, n in pending.items():
                counts[(marker, *key)] += n
            pending.clear()
        print(line)
    for key, n in pending.items():
        counts[("(after the last marker)", *key)] += n
    print(f"\nsanitize_report: {reports} reports, {kept} shown in full")
    for (marker, kind, kernel), n in sorted(counts.items()):
        print(f"  {n:>9}  {marker} | {kind} | {kernel}")
    return 0 if summary == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
