"""`python -m bench` (or `make bench`): every scenario, each in its own fresh vhost and database.

    python -m bench                      # all scenarios, full counts
    python -m bench --quick              # all scenarios, small counts (a smoke run)
    python -m bench --scenario latency   # one scenario (by number or name); the raw floor runs first
    python -m bench --scenario 5 --pending 100000

Results: a table per scenario on the terminal, bench/out/<scenario>.json, bench/out/<scenario>.png,
and bench/out/summary.md (the table RESULTS.md quotes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import common as c
from testing.system import clean_up_on_sigterm

SCENARIOS = {
    "1": "raw",
    "2": "throughput",
    "3": "latency",
    "4": "timers",
    "5": "pending",
    "6": "hot_sku",
    "7": "relay",
}


def runner(name: str) -> Any:
    from bench import raw, relay, service, timers

    return {
        "raw": raw.run,
        "throughput": service.throughput,
        "latency": service.latency,
        "timers": timers.timer_accuracy,
        "pending": timers.pending,
        "hot_sku": service.hot_sku,
        "relay": relay.relay,
    }[name]


def machine() -> dict[str, Any]:
    from testing.broker import rabbit_api

    def pg_version() -> str:
        try:
            import psycopg2

            from testing.database import PG_ADMIN_DSN

            conn = psycopg2.connect(PG_ADMIN_DSN)
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                version = cur.fetchone()[0]
            conn.close()
            return str(version)
        except Exception as exc:  # reported, not fatal
            return f"unknown ({exc})"

    try:
        overview = rabbit_api("GET", "/overview")
        rabbit = f"{overview['rabbitmq_version']} (Erlang {overview['erlang_version']})"
    except Exception as exc:
        rabbit = f"unknown ({exc})"
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if commit and dirty:
            commit += " plus uncommitted changes"
    except OSError:
        commit = ""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rabbitmq": rabbit,
        "postgresql": pg_version(),
        "commit": commit,
        "load_average_at_start": c.machine_busy(),
    }


def summary_md(ctx: c.Context, info: dict[str, Any], ran: list[str], failed: dict[str, str]) -> str:
    """The measured tables as Markdown, for bench/RESULTS.md."""
    lines = [
        f"Run: {'quick (--quick)' if ctx.quick else 'full'}; {info['date']}; commit {info['commit']}",
        f"Machine: {info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB, kernel {info['kernel']}, "
        f"Python {info['python']}, RabbitMQ {info['rabbitmq']}, PostgreSQL {info['postgresql']}; "
        f"load average at start {info['load_average_at_start']:.2f}",
        "",
    ]
    for name in ran:
        res = ctx.floor if name == "raw" else ctx.results.get(name)
        if not res or "table" not in res:
            continue
        rows = res["table"]
        width = max(len(r) for r in rows)
        lines.append(f"### {name}")
        lines.append("")
        if name == "latency":
            header = ["", "service", "raw pipeline (naive event)", "ratio"]
        else:
            header = ["measure", "value", "unit"][:width] + [""] * max(0, width - 3)
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in rows:
            lines.append("| " + " | ".join(c.fmt(v) for v in r) + " |")
        lines.append("")
    for name, error in failed.items():
        lines.append(f"### {name}: FAILED\n\n```\n{error}\n```\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run of every scenario")
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        help=f"run only this one (repeatable): {', '.join(f'{k}={v}' for k, v in SCENARIOS.items())}",
    )
    parser.add_argument(
        "--pending",
        type=int,
        default=None,
        help="scenario 5: unpaid orders pending at once (default 1,000,000; quick 20,000)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile a placement process in scenarios 2-3 (py-spy when found, and cProfile)",
    )
    parser.add_argument(
        "--placement-procs",
        type=int,
        default=2,
        help="order.placement processes in scenarios 2-4 and 6 (default 2)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra service setting for every scenario (e.g. PREFETCH=200)",
    )
    args = parser.parse_args(argv)

    chosen: list[str] = []
    for s in args.scenario or list(SCENARIOS):
        name = SCENARIOS.get(s, s)
        if name not in SCENARIOS.values():
            parser.error(f"unknown scenario {s!r}")
        if name not in chosen:
            chosen.append(name)
    chosen.sort(key=lambda n: list(SCENARIOS.values()).index(n))
    pending = args.pending or (20_000 if args.quick else 1_000_000)
    ctx = c.Context(
        quick=args.quick,
        pending=pending,
        profile=args.profile,
        placement_procs=args.placement_procs,
        extra_env=dict(kv.split("=", 1) for kv in args.env),
    )
    info = machine()
    c.console.rule(f"bench: {', '.join(chosen)} ({'quick' if args.quick else 'full'})")
    c.console.print(json.dumps(info))
    ran: list[str] = []
    failed: dict[str, str] = {}
    started = time.monotonic()
    if "raw" not in chosen:
        c.console.rule("1. raw floor (quick version, for the ratios of this run)")
        runner("raw")(ctx, full=False)
        ran.append("raw")
    for name in chosen:
        c.console.rule(f"{next(k for k, v in SCENARIOS.items() if v == name)}. {name}")
        try:
            result = runner(name)(ctx)
            if name != "raw":
                ctx.results[name] = result
            ran.append(name)
        except Exception as exc:  # one scenario failing must not hide the others' numbers
            traceback.print_exc()
            failed[name] = f"{type(exc).__name__}: {exc}"
            ran.append(name)
    summary = summary_md(ctx, info, ran, failed)
    c.OUT.mkdir(parents=True, exist_ok=True)
    (c.OUT / "summary.md").write_text(summary)
    (c.OUT / "machine.json").write_text(json.dumps(info, indent=2))
    c.console.rule(f"done in {time.monotonic() - started:,.0f}s; bench/out/summary.md")
    if failed:
        c.console.print(f"[red]failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    clean_up_on_sigterm()
    sys.exit(main())
