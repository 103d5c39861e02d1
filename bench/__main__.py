"""Run every bench and write their figures into docs/performance.md.

`python -m bench` runs bench.rest, bench.nodes, bench.executions, bench.models and
bench.receive one after the other (about 15 minutes; each starts and stops its own
stack, so run it on a quiet machine), then replaces the section between the ``bench:begin`` and ``bench:end``
markers at the top of docs/performance.md with each bench's report: every figure next to
its baseline from the same run, the date, the machine and the commit. The hand-written
history below the markers is left as it is. `--only rest,models` runs some of them;
`--dry-run` prints the section instead of writing it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# name -> (module, args, the line its report starts with)
BENCHES: dict[str, tuple[str, list[str], str]] = {
    "rest": ("bench.rest", [], "GET /api/"),
    "nodes": ("bench.nodes", [], "Node channel,"),
    "executions": ("bench.executions", [], "Executions,"),
    "models": ("bench.models", [], "Model files,"),
    "receive": ("bench.receive", [], "Reading a request body"),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        memory = f", {kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    return f"{os.cpu_count()} CPUs ({cpu}){memory}, Python {platform.python_version()}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report_of(output: str, starts: str) -> str:
    """The bench's closing report: from the line that starts it to the end."""
    lines = [line for line in output.splitlines() if not line.startswith(("INFO ", "(", "  run "))
             or line.startswith("(vs raw")]
    if starts:
        for i, line in enumerate(lines):
            if line.startswith(starts):
                return "\n".join(lines[i:]).strip()
    return "\n".join(lines[-25:]).strip()


def run(name: str) -> str:
    module, args, starts = BENCHES[name]
    print(f"== {module}", flush=True)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          capture_output=True, text=True)
    took = time.monotonic() - started
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        print(tail, file=sys.stderr)
        return f"`python -m {module}` failed (exit {done.returncode}) after {took:.0f} s:\n\n" \
               f"```\n{tail.strip()}\n```"
    text = report_of(done.stdout, starts)
    print(text, flush=True)
    return f"`python -m {module}` ({took:.0f} s):\n\n```\n{text}\n```"


def section(parts: dict[str, str]) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n\n".join(f"### {name}\n\n{text}" for name, text in parts.items())
    return (f"{BEGIN}\n## Latest run of `python -m bench`\n\n{when}, {machine()}, commit "
            f"{commit()}. Each figure is printed next to its baseline from the same run; "
            f"the sections below explain them.\n\n{body}\n{END}")


def write(text: str, report: Path = REPORT) -> None:
    old = report.read_text()
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text + rest.split(END, 1)[1]
    else:  # first run: after the title and the introduction's table
        title, _, rest = old.partition("\n## ")
        new = f"{title}\n{text}\n\n## {rest}" if rest else f"{old}\n{text}\n"
    report.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(BENCHES),
                        help=f"comma-separated, from: {', '.join(BENCHES)}")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        sys.exit(f"unknown bench(es): {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    text = section({name: run(name) for name in names})
    if args.dry_run:
        print(text)
    else:
        write(text)
        print(f"wrote {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
