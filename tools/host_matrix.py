#!/usr/bin/env python3
"""Run the host tests on every ComfyUI of the version matrix and print one row per version.

    python tools/host_matrix.py HOST_DIR [HOST_DIR ...] [--markdown] [-k EXPR] [--install]

A HOST_DIR is what ``comfy-host.sh SNAPSHOT HOST_DIR`` sets up: ``HOST_DIR/ComfyUI`` (a checkout) and
``HOST_DIR/venv`` (its Python, with ComfyUI's requirements). ``--install`` first installs the pack's own
requirements into that venv, with torch held at the version the venv has (a constraint, so pip never swaps it).
Each host runs ``pytest tests/host`` in its own Python with ``COMFYUI_PATH`` set, one host after the other; the
counts come from pytest's JUnit report, so a skipped test shows as skipped, never as passed. The contract tests
write their latents (``$COLLAB_HOST_LATENTS``); at the end the script compares each host's with the first host's
and fails above a relative difference of 1e-5.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def host_version(comfy: Path) -> str:
    text = (comfy / "comfyui_version.py").read_text() if (comfy / "comfyui_version.py").is_file() else ""
    m = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return m.group(1) if m else "unknown"


def frontend_version(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                          "print(m.version('comfyui-frontend-package'))"], capture_output=True, text=True)
    return out.stdout.strip() or "-"


def install_requirements(python: Path) -> None:
    torch = subprocess.run([str(python), "-c", "import torch; print(torch.__version__.split('+')[0])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pin:
        pin.write(f"torch=={torch}\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                    str(REPO / "requirements.txt"), "-c", pin.name], check=True)
    os.unlink(pin.name)


def compare_latents(rows: list[dict]) -> list[str]:
    """The latents the contract tests wrote on each host, compared with the first host's (relative max error)."""
    from safetensors.torch import load_file

    lines = []
    base = rows[0]
    for r in rows[1:]:
        for f in sorted(Path(base["latents"]).glob("*.safetensors")):
            other = Path(r["latents"]) / f.name
            if not other.is_file():
                lines.append(f"{f.stem}: missing on {r['comfyui']}")
                continue
            a, b = load_file(str(f))["samples"], load_file(str(other))["samples"]
            rel = float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)
            lines.append(f"{f.stem}: {base['comfyui']} vs {r['comfyui']} rel {rel:.1e}")
    return lines


def run_host(host_dir: Path, extra: list[str], latents: Path) -> dict:
    comfy, python = host_dir / "ComfyUI", host_dir / "venv" / "bin" / "python"
    if not (comfy / "main.py").is_file() or not python.is_file():
        raise SystemExit(f"{host_dir}: not a host set up by comfy-host.sh (needs ComfyUI/main.py and venv/bin/python)")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        env = dict(os.environ, COMFYUI_PATH=str(comfy), PYTHONUNBUFFERED="1", COLLAB_HOST_LATENTS=str(latents))
        started = time.perf_counter()
        proc = subprocess.run([str(python), "-m", "pytest", "tests/host", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={report}", *extra], cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        failed = []
        if report.is_file():
            root = ET.parse(report).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            for k in counts:
                counts[k] = int(suite.get(k, 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"host": host_dir.name, "comfyui": host_version(comfy), "frontend": frontend_version(python),
            "passed": passed, "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"],
            "seconds": seconds, "returncode": proc.returncode, "failed_tests": failed, "latents": str(latents),
            "tail": proc.stdout[-3000:] + proc.stderr[-2000:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hosts", nargs="+", type=Path, help="host folders made by comfy-host.sh")
    ap.add_argument("--install", action="store_true", help="install the pack's requirements into each host's venv")
    ap.add_argument("--markdown", action="store_true", help="print the table in Markdown (for docs/comfyui.md)")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression (a subset of the host tests)")
    args = ap.parse_args(argv)
    extra = ["-k", args.keyword] if args.keyword else []
    rows = []
    store = Path(tempfile.mkdtemp(prefix="collab-matrix-"))
    for i, h in enumerate(args.hosts):
        if args.install:
            install_requirements(h / "venv" / "bin" / "python")
        row = run_host(h, extra, store / f"{i}-{h.name}")
        rows.append(row)
        print(f"{row['comfyui']:>8}  {row['host']:<14} passed {row['passed']:>3}  failed {row['failed']:>3}  "
              f"skipped {row['skipped']:>3}  {row['seconds']:6.0f} s", flush=True)
        for name in row["failed_tests"]:
            print(f"          FAILED {name}", flush=True)
        if row["returncode"] not in (0, 1) or (row["failed"] and not row["failed_tests"]):
            print(row["tail"], flush=True)
    if args.markdown:
        print("\n| ComfyUI | snapshot | front end | passed | failed | skipped | seconds |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['comfyui']} | {r['host']} | {r['frontend']} | {r['passed']} | {r['failed']} | "
                  f"{r['skipped']} | {r['seconds']:.0f} |")
    mismatch = False
    if len(rows) > 1:
        print("\nThe same graphs on every host (KSampler and Guider + SamplerCustomAdvanced latents):")
        for line in compare_latents(rows):
            print("  " + line)
            mismatch |= "missing" in line or float(line.rsplit(" ", 1)[1]) > 1e-5
    bad = [r for r in rows if r["failed"] or r["skipped"] or r["passed"] == 0]
    return 1 if bad or mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
