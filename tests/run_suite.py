"""Run every test module in its own pytest process, then print one closing summary line.

Each module gets a fresh interpreter, so Ray sessions, MLflow's global tracking state and torch
thread settings of one module cannot leak into the next. Extra arguments go to every pytest run
(e.g. `-m "not slow"`). Exit status: 0 only when no module failed and at least one test ran.
"""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from tempfile import TemporaryDirectory

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    files = sorted(HERE.glob("test_*.py"))
    totals = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failed_modules: list[str] = []
    started = time.time()
    with TemporaryDirectory() as tmp:
        for index, path in enumerate(files, 1):
            report = Path(tmp) / f"{path.stem}.xml"
            t0 = time.time()
            print(f"[{index}/{len(files)}] {path.name}", flush=True)
            rc = subprocess.call([sys.executable, "-m", "pytest", str(path), "-q", f"--junitxml={report}", *argv],
                                 cwd=HERE.parent)
            counts = _counts(report)
            for key in totals:
                totals[key] += counts[key]
            if rc not in (0, 5) or counts["failed"] or counts["errors"]:
                failed_modules.append(path.name)
            print(f"    {path.name}: {counts['passed']} passed, {counts['failed']} failed, "
                  f"{counts['errors']} errors, {counts['skipped']} skipped in {time.time() - t0:.0f} s", flush=True)
    ran = totals["passed"] + totals["failed"] + totals["errors"]
    print(f"\nmodules failed: {', '.join(failed_modules) or 'none'}; total {time.time() - started:.0f} s")
    print(f"{totals['passed']} passed, {totals['failed'] + totals['errors']} failed, {totals['skipped']} skipped")
    if ran == 0:
        print("no test ran", file=sys.stderr)
        return 5
    return 1 if failed_modules else 0


def _counts(report: Path) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    if not report.exists():
        counts["errors"] = 1  # pytest itself crashed before writing a report
        return counts
    root = ET.parse(report).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.findall("testsuite")):
        tests = int(suite.get("tests", 0))
        failures, errors, skipped = (int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
        counts["failed"] += failures
        counts["errors"] += errors
        counts["skipped"] += skipped
        counts["passed"] += tests - failures - errors - skipped
    return counts


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
