"""Benchmark the import time of prunekit beyond torch's (target: at most 0.3 s).

Fresh processes, interleaved round by round (the order alternates between rounds so that
neither command always runs first): ``python -c "import torch"`` vs ``python -c "import
torch, prunekit"``; the figure is the median of the per-round differences. A third
command times ``import prunekit`` inside a process that has already imported torch, a
cross-check free of the interpreter's start-up noise.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_import.py [--repeats 15] [--write]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MD_FILE, Rows, write_section

TARGET_S = 0.3
TORCH = "import torch"
BOTH = "import torch, prunekit"
IN_PROCESS = (
    "import time, torch; start = time.perf_counter(); import prunekit; "
    "print(time.perf_counter() - start)"
)
COMMANDS = (TORCH, BOTH, IN_PROCESS)


def run(code: str) -> float:
    """Seconds of one fresh ``python -c code``; for :data:`IN_PROCESS`, what it prints."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    return float(done.stdout) if code == IN_PROCESS else seconds


def measure(repeats: int, console: Console) -> dict[str, list[float]]:
    """``repeats`` interleaved rounds of every command, after one untimed warm-up round."""
    for code in COMMANDS:
        run(code)
    times: dict[str, list[float]] = {code: [] for code in COMMANDS}
    for r in range(repeats):
        console.log(f"round {r + 1}/{repeats}")
        for code in COMMANDS if r % 2 == 0 else COMMANDS[::-1]:
            times[code].append(run(code))
    return times


def spread(xs: list[float]) -> str:
    return f"{median(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f})"


def add_rows(rows: Rows, times: dict[str, list[float]]) -> None:
    beyond = [both - torch for torch, both in zip(times[TORCH], times[BOTH], strict=True)]
    rows.add(f'`python -c "{TORCH}"`', spread(times[TORCH]))
    rows.add(f'`python -c "{BOTH}"`', spread(times[BOTH]))
    rows.add(
        "import prunekit beyond import torch (per-round difference)",
        spread(beyond),
        f"<= {TARGET_S} s",
        median(beyond) <= TARGET_S,
    )
    rows.add(
        "cross-check: `import prunekit` timed inside a process after torch",
        spread(times[IN_PROCESS]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (>= 10)")
    parser.add_argument("--write", action="store_true", help=f"update {MD_FILE.name}")
    args = parser.parse_args()
    console = Console(width=130)
    rows = Rows()  # records the load average from here to the end
    add_rows(rows, measure(args.repeats, console))
    rows.show("bench_import", console)
    if args.write:
        extra = f"medians of {args.repeats} interleaved rounds of fresh processes"
        write_section(
            "bench_import", ["", rows.protocol("bench_import.py", extra), "", *rows.markdown()]
        )
        console.print(f"wrote {MD_FILE}")


if __name__ == "__main__":
    main()
