#!/usr/bin/env python3
"""Run the whole bad-input table (tests/bad_inputs.py) and count the verdicts, per category and in all.

    python tools/bad_input_campaign.py [--show traceback,garbage] [--json FILE]

Verdicts: clear (exit 2 / a CollabError with a message, nothing written, no input changed), traceback,
garbage (exit 0 with an unusable result, or something written by a failed run), accepted (a usable result),
crash (with --isolate: the process was killed, ran out of memory or did not answer in time).
The table runs in-process against the ``collab_core`` first on ``sys.path`` (set PYTHONPATH to measure another
checkout, e.g. an older commit, with the same cases).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO / "tests"))
sys.path.append(str(REPO))  # last: another checkout given in PYTHONPATH is measured instead

from bad_inputs import CASES, DEMO, Workspace, run_case  # noqa: E402

VERDICTS = ("clear", "traceback", "garbage", "accepted", "crash")


def one(index: int, root: Path) -> dict:
    """Run case ``index`` in this process (the worker of --isolate)."""
    import logging

    logging.disable(logging.WARNING)
    from collab_core.models import load_pipeline

    ws = Workspace(root / "inputs") if not (root / "inputs" / "mask.png").is_file() else _reuse(root / "inputs")
    case = CASES[index]
    pipe = load_pipeline(DEMO) if case.call is not None else None
    got = run_case(case, ws, root / f"out{index}", pipe)
    return {"verdict": got.verdict, "message": got.message[-600:]}


def _reuse(path: Path):
    ws = Workspace.__new__(Workspace)
    ws.root = path
    ws.hashes = ws.snapshot()
    return ws


def isolated(index: int, root: Path, timeout: float, memory_gb: float) -> dict:
    """Case ``index`` in a child process with a memory cap and a time limit: an old build that allocates without
    bounds or never returns is counted as a crash instead of taking the campaign down."""
    import resource
    import subprocess

    def cap():
        limit = int(memory_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        proc = subprocess.run([sys.executable, __file__, "--one", str(index), "--root", str(root)], capture_output=True,
                              text=True, timeout=timeout, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return {"verdict": "crash", "message": f"no answer within {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"verdict": "crash", "message": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--show", default="traceback,garbage,crash", help="verdicts whose cases are printed with their message")
    ap.add_argument("--json", type=Path, help="write every case's verdict and message here")
    ap.add_argument("--isolate", action="store_true",
                    help="run each case in its own process with a memory cap and a time limit (for old builds)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per case with --isolate")
    ap.add_argument("--memory-gb", type=float, default=8, help="address-space cap per case with --isolate")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.root)))
        return 0
    import logging

    logging.disable(logging.WARNING)
    from collab_core.models import load_pipeline

    root = Path(tempfile.mkdtemp(prefix="collab-bad-inputs-"))
    ws = Workspace(root / "inputs")
    pipe = None if args.isolate else load_pipeline(DEMO)
    per_cat = collections.defaultdict(collections.Counter)
    rows = []
    for i, case in enumerate(CASES):
        if args.isolate:
            got = isolated(i, root, args.timeout, args.memory_gb)
        else:
            o = run_case(case, ws, root / f"out{i}", pipe)
            got = {"verdict": o.verdict, "message": o.message[-600:]}
        per_cat[case.category][got["verdict"]] += 1
        rows.append({"id": case.id, "category": case.category, "expected": case.expect, **got})
        if got["verdict"] in args.show.split(","):
            msg = got["message"].strip().splitlines()[-1][:200] if got["message"].strip() else ""
            print(f"[{got['verdict']}] {case.id}: {msg}", flush=True)
    total = collections.Counter()
    print(f"\n{'category':<10} " + " ".join(f"{v:>9}" for v in VERDICTS))
    for cat, counts in per_cat.items():
        total.update(counts)
        print(f"{cat:<10} " + " ".join(f"{counts[v]:>9}" for v in VERDICTS))
    print(f"{'all':<10} " + " ".join(f"{total[v]:>9}" for v in VERDICTS) + f"   ({len(CASES)} cases)")
    wrong = sum(r["verdict"] != r["expected"] for r in rows)
    print(f"as expected: {len(CASES) - wrong} of {len(CASES)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
