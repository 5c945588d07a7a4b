"""What the bench scripts that run each case in a child process share: their arguments, and reading
the child's one RESULT line (a child process per case keeps peak memory and process groups apart)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def parse_args(doc: str, cases: str, steps_help: str) -> argparse.Namespace:
    """--cases, --steps, --workdir and the hidden --one CASE that the parent passes to a child."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=cases)
    ap.add_argument("--steps", type=int, default=None, help=steps_help)
    ap.add_argument("--workdir", default=None, help="keep built models here (default: a temp dir)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    return ap.parse_args()


def child_result(cmd: list[str], label: str, env: dict | None = None) -> dict | None:
    """Run ``cmd``; its stdout line ``RESULT {json}`` as a dict, or None (the failure is printed)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(f"{label}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(line[7:])


def run_cases(
    script: str, args: argparse.Namespace, run_case: Callable[[str, int | None, Path], dict]
) -> list[dict]:
    """Every case of ``args.cases`` in a child process of ``script`` (``--one CASE``), sharing a work
    folder (a temp one unless --workdir); their results, in order. In the child (``args.one``) this
    runs ``run_case(name, steps, workdir)``, prints its RESULT line and returns []."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dbk-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("RESULT " + json.dumps(run_case(args.one, args.steps, workdir)))
        return []
    rows: list[dict] = []
    try:
        for name in args.cases.split(","):
            cmd = [sys.executable, script, "--one", name, "--workdir", str(workdir)]
            cmd += ["--steps", str(args.steps)] if args.steps else []
            rows += [r for r in [child_result(cmd, name)] if r]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows
