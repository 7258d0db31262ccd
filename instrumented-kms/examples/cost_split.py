#!/usr/bin/env python3
"""Where the library's CPU per request goes, from `perf record` of the bench.

    BENCH_PERF=/tmp/perf BENCH_CONFIGS=fmt-only,ours-no-console \\
      BENCH_LOADS=16,512 BENCH_ROUNDS=1 BENCH_SECS=10 BENCH_NO_TASKDUMP=1 \\
      cargo run --release -p instrumented-kms --example bench --features full
    python3 instrumented-kms/examples/cost_split.py /tmp/perf

The bench samples each server's CPU (`cpu-clock`, 1999 Hz) from READY to
the end of its load and writes the requests it answered and its CPU time
beside the samples. Each sample goes to the first part whose pattern its
function's symbol matches (code inlined into a function counts as that
function's); a part's share of the samples times the CPU per request is its
cost per request, compared with the `fmt-only` cell (what the upstream KMS
pays today). Sampled at full speed, so work done per second (samplers,
heartbeat, export batches) weighs what it weighs in the real run, which an
instruction count under callgrind, 50 times slower, does not.
"""

import re
import subprocess
import sys
from pathlib import Path

# (part, symbol patterns), first match wins. The `poll` of a future wrapper
# (tracing's span instrumentation, tokio-metrics' monitor, tokio's task-dump
# root) inlines the wrapped future, so its samples are mostly the service's.
PARTS = [
    ("the service itself (hyper, tokio, handler, libc)", [
        r"tracing::instrument::Instrumented<T> as core::future::future::Future>::poll",
        r"tokio_metrics::task::Instrumented<T,M> as core::future::future::Future>::poll",
    ]),
    ("span layer (ours)", [r"instrumented_kms::spans::(layer|ids|sampler|redact|record|reporter)"]),
    ("open-span registry (ours)", [r"instrumented_kms::spans::registry"]),
    ("export: encode (ours)", [r"instrumented_kms::export::encode", r"\bprost::"]),
    ("export: queue, thread, transport", [r"instrumented_kms::export", r"\btonic::", r"\bh2::", r"\btower::"]),
    ("task monitor (tokio-metrics)", [r"\btokio_metrics::"]),
    ("poll hooks, heartbeat, watchdog", [r"instrumented_kms::(watchdog|runtime)"]),
    ("rpc and outbound spans (ours)", [r"instrumented_kms::rpc"]),
    ("metrics and process samplers", [r"instrumented_kms::(metrics|process)"]),
    ("other instrumented-kms", [r"instrumented_kms::"]),
    ("console (console-subscriber)", [r"\bconsole_subscriber::"]),
    ("fmt layer", [r"tracing_subscriber::fmt"]),
    ("span registry (tracing-subscriber)", [r"tracing_subscriber::registry", r"\bsharded_slab::"]),
    ("tracing dispatch and filters", [r"\btracing_core::", r"\btracing::", r"\btracing_subscriber::"]),
    ("allocator", [r"\bmalloc\b", r"\bfree\b", r"\bcalloc\b", r"\brealloc\b", r"_int_(malloc|free)", r"__libc_(malloc|free)"]),
    ("the service itself (hyper, tokio, handler, libc)", [r".*"]),
]
COMPILED = [(name, [re.compile(p) for p in pats]) for name, pats in PARTS]
SAMPLE = re.compile(r"^\s*([\d.]+)%\s+\[[.k]\]\s+(.*?)\s*$")


def part_of(symbol):
    for name, pats in COMPILED:
        if any(p.search(symbol) for p in pats):
            return name
    return PARTS[-1][0]


def split(path):
    """Sample shares per part of one `perf record` file."""
    out = subprocess.run(
        ["perf", "report", "-i", str(path), "--stdio", "--no-children",
         "--sort", "sym", "--percent-limit", "0"],
        check=True, capture_output=True, text=True,
    ).stdout
    parts = {}
    for line in out.splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        part = part_of(m.group(2))
        parts[part] = parts.get(part, 0.0) + float(m.group(1)) / 100.0
    return parts


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: cost_split.py DIR (the bench's BENCH_PERF directory)")
    cells = {}
    for served_file in sorted(Path(sys.argv[1]).glob("*.served")):
        perf = served_file.with_suffix(".perf")
        fields = served_file.read_text().split()
        if len(fields) != 2 or not perf.exists():
            continue
        served, cpu_us = float(fields[0]), float(fields[1])
        if served <= 0:
            continue
        per_request = cpu_us / served
        cells[served_file.stem] = (
            {p: share * per_request for p, share in split(perf).items()},
            per_request,
        )
    if not cells:
        sys.exit("no perf data with a .served file in " + sys.argv[1])
    labels = sorted(cells, key=lambda l: (int(l.rsplit("-", 1)[1]), l))
    print("CPU µs per request, by part (perf cpu-clock samples of each function's own symbol)")
    print(f"{'part':<50}" + "".join(f"{l:>20}" for l in labels))
    for name in dict.fromkeys(name for name, _ in PARTS):
        row = [cells[l][0].get(name, 0.0) for l in labels]
        if all(v < 0.05 for v in row):
            continue
        print(f"{name:<50}" + "".join(f"{v:>20.2f}" for v in row))
    print(f"{'total':<50}" + "".join(f"{cells[l][1]:>20.2f}" for l in labels))
    for l in labels:
        conns = l.rsplit("-", 1)[1]
        base = cells.get(f"fmt-only-{conns}")
        if base and l != f"fmt-only-{conns}":
            print(f"{l}: {cells[l][1] - base[1]:+.2f} µs per request over fmt-only-{conns}")


if __name__ == "__main__":
    main()
