"""The host-side tools keep working with the pack's current nodes: tools/bench_comfy_step.py runs a tiny
collaborative step on this ComfyUI in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hostutil import COMFY, REPO


def test_bench_comfy_step_runs_on_this_host(tmp_path):
    out = tmp_path / "step.json"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench_comfy_step.py"), "--size", "tiny", "--steps",
                           "2", "--threads", "1", "--json", str(out)], env=dict(os.environ, COMFYUI_PATH=COMFY),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = json.loads(out.read_text())
    assert set(numbers["wall_per_step_s"]) == {"mask alone", "text alone", "collaborative (2 UNets + 2 diffusers)"}
    assert all(v > 0 for v in numbers["wall_per_step_s"].values())
    assert numbers["dtype"] == "torch.float32" and numbers["attention"]
