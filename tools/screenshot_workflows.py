#!/usr/bin/env python3
"""Open ComfyUI's real front end in headless Chromium, load each workflow of workflows/, save a screenshot.

    COMFYUI_PATH=/path/to/ComfyUI python tools/screenshot_workflows.py [--python VENV/bin/python]
        [--models DIR] [--run] [--normalize] [--export-api DIR] [--out docs/screenshots]

It starts a headless ComfyUI server on loopback with this pack as a custom node (isolated: a temporary base
directory, in-memory database), starts Chromium with a fresh profile, and drives the page through the Chrome
DevTools protocol. For each workflow it checks that every node type is registered in the front end (no missing
nodes), optionally queues it from the page (--run; needs checkpoints under --models, which may hold the
official files or any files with the official names), and writes a PNG.

--normalize writes each workflow back as the front end serialises it (app.graph.serialize()), with node sizes
computed by the front end and columns spread so nodes do not overlap. --export-api writes the prompt the front
end would queue (app.graphToPrompt()) to DIR/<name>.json; the host tests compare their own conversion with it.

Needs: chromium (Debian: apt-get install chromium) and websocket-client (pip) in the running Python.
Nothing is downloaded; Chromium only talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "comfyui-collaborative-diffusion"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, data: dict | None = None, timeout: float = 30):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else None


def wait_for(fn, timeout: float, what: str, interval: float = 0.25):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            v = fn()
            if v:
                return v
        except Exception as exc:  # noqa: BLE001 - polling
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what} ({last})")


class Server:
    """A headless ComfyUI with this pack, in a throw-away base directory."""

    def __init__(self, comfy: Path, python: str, models: Path | None, inputs: list[Path], threads: int = 1):
        self.base = Path(tempfile.mkdtemp(prefix="collab-shots-"))
        (self.base / "custom_nodes").mkdir()
        (self.base / "input").mkdir()
        os.symlink(REPO, self.base / "custom_nodes" / PACK_DIR_NAME)
        for p in inputs:
            shutil.copy(p, self.base / "input" / p.name)
        yaml = self.base / "extra_model_paths.yaml"
        lines = ["collab:"]
        if models:
            lines.append(f"    collaborative_diffusion: {models}")
        yaml.write_text("\n".join(lines) + "\n" if models else "")
        self.port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
               "--preview-method", "latent2rgb"]
        if models:
            cmd += ["--extra-model-paths-config", str(yaml)]
        self.log = open(self.base / "server.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=comfy, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(lambda: http_json(self.url + "/system_stats", timeout=2), 120, "the ComfyUI server")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)


class Chrome:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    def __init__(self, binary: str, width: int, height: int):
        import websocket  # websocket-client

        self.profile = tempfile.mkdtemp(prefix="collab-chrome-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
             "--hide-scrollbars", "--mute-audio", f"--user-data-dir={self.profile}",
             f"--remote-debugging-port={self.port}", "--remote-debugging-address=127.0.0.1",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pages = wait_for(lambda: [p for p in http_json(f"http://127.0.0.1:{self.port}/json", timeout=2)
                                  if p.get("type") == "page"], 60, "Chromium")
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self.msg_id = 0
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params):
        self.msg_id += 1
        mid = self.msg_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str, timeout: float = 120):
        res = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                        timeout=int(timeout * 1000))
        if "exceptionDetails" in res:
            raise RuntimeError(f"page error: {res['exceptionDetails'].get('exception', {}).get('description')}")
        return res.get("result", {}).get("value")

    def screenshot(self, path: Path):
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


LAYOUT_JS = r"""
(() => {
  // Sizes as the front end computes them; nodes of one column stacked without overlap.
  const nodes = app.graph._nodes;
  for (const n of nodes) {
    const s = n.computeSize();
    n.size[0] = Math.max(n.size[0], s[0]);
    n.size[1] = Math.max(n.size[1], s[1]);
  }
  const cols = {};
  for (const n of nodes) (cols[Math.round(n.pos[0])] ||= []).push(n);
  for (const col of Object.values(cols)) {
    col.sort((a, b) => a.pos[1] - b.pos[1]);
    let y = null;
    for (const n of col) {
      if (y !== null && n.pos[1] < y) n.pos[1] = y;
      y = n.pos[1] + n.size[1] + 60;   // title bar + gap
    }
  }
  app.graph.setDirtyCanvas(true, true);
  return true;
})()
"""

FIT_JS = r"""
(() => {
  const nodes = app.graph._nodes;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const c = app.canvas.canvas, m = 30;
  const top = 80, W = c.clientWidth, H = c.clientHeight - top;
  const scale = Math.min((W - 2 * m) / (x1 - x0), (H - 2 * m) / (y1 - y0), 1.0);
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [(m + (W - 2 * m - (x1 - x0) * scale) / 2) / scale - x0, (top + m) / scale - y0];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return scale;
})()
"""


OFFICIAL_NAMES = {"tiny_text": "512_text", "tiny_mask": "512_mask", "tiny_vae": "512_vae",
                  "tiny_codiff_mask_text": "512_codiff_mask_text"}


def fixture_models(reference: Path) -> Path:
    """A models folder with the test fixtures' tiny checkpoints under the official names (and their YAMLs), so
    that the shipped workflows run unchanged (their pictures are noise: the tiny weights are random)."""
    d = Path(tempfile.mkdtemp(prefix="collab-models-"))
    for tiny, official in OFFICIAL_NAMES.items():
        os.symlink(reference / "pretrained" / f"{tiny}.ckpt", d / f"{official}.ckpt")
        os.symlink(reference / "configs" / f"{tiny}.yaml", d / f"{official}.yaml")
        os.symlink(reference / "configs" / f"{tiny}.yaml", d / f"{tiny}.yaml")  # sub-configs named by the codiff YAML
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout ($COMFYUI_PATH)")
    ap.add_argument("--python", default=sys.executable, help="Python of ComfyUI's environment")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    ap.add_argument("--models", type=Path, help="folder for models/collaborative_diffusion (files with official names)")
    ap.add_argument("--fixture-models", type=Path, metavar="REFERENCE_DIR",
                    help="use the tiny test checkpoints of REFERENCE_DIR (../shared/fixtures/reference) under the "
                         "official names")
    ap.add_argument("--workflows", type=Path, default=REPO / "workflows")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    ap.add_argument("--run", action="store_true", help="queue each workflow from the page and wait for it")
    ap.add_argument("--normalize", action="store_true", help="write workflows back as the front end saves them")
    ap.add_argument("--export-api", type=Path, help="write the front end's API prompt of each workflow here")
    ap.add_argument("--size", default="2560x1440")
    ap.add_argument("--only", nargs="*", help="workflow stems to process")
    args = ap.parse_args(argv)
    if not args.comfy:
        ap.error("give --comfy or set COMFYUI_PATH")
    width, height = (int(v) for v in args.size.split("x"))
    flows = sorted(p for p in args.workflows.glob("*.json") if not args.only or p.stem in args.only)
    inputs = sorted(args.workflows.glob("*.png"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fixture_models:
        args.models = fixture_models(args.fixture_models.resolve())
    server = Server(Path(args.comfy), args.python, args.models, inputs)
    chrome = None
    failures = []
    try:
        http_json(server.url + "/api/settings", {"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True,
                                                  "Comfy.Workflow.ShowMissingModelsWarning": False,
                                                  "Comfy.Minimap.Visible": False,
                                                  "LiteGraph.Canvas.MinFontSizeForLOD": 1})
        chrome = Chrome(args.chromium, width, height)
        chrome.send("Page.enable")
        chrome.send("Page.navigate", url=server.url + "/")
        wait_for(lambda: chrome.eval("!!(window.app && window.app.graph && window.app.canvas && "
                                     "window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 100)"),
                 120, "the ComfyUI front end")
        time.sleep(2)
        for path in flows:
            wf = json.loads(path.read_text())
            chrome.eval(f"app.loadGraphData({json.dumps(wf)}, true, true, {json.dumps(path.stem)}).then(() => true)")
            time.sleep(1.0)
            missing = chrome.eval("app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                                  ".map(n => n.type)")
            if missing:
                failures.append(f"{path.name}: missing node types {missing}")
            chrome.eval("document.querySelectorAll('.p-dialog-mask .p-dialog-close-button, .p-dialog-header-close')"
                        ".forEach(b => b.click()); true")
            if args.normalize:
                chrome.eval(LAYOUT_JS)
                saved = chrome.eval("JSON.stringify(app.graph.serialize())")
                path.write_text(json.dumps(json.loads(saved), indent=2) + "\n")
            if args.export_api:
                args.export_api.mkdir(parents=True, exist_ok=True)
                api = chrome.eval("app.graphToPrompt().then(p => JSON.stringify(p.output))")
                (args.export_api / f"{path.stem}.json").write_text(json.dumps(json.loads(api), indent=2) + "\n")
            if args.run:
                before = set(http_json(server.url + "/history"))
                chrome.eval("app.queuePrompt(0, 1).then(() => true)")
                hist = wait_for(lambda: [v for k, v in http_json(server.url + "/history").items()
                                         if k not in before and v.get("status", {}).get("completed") is not None],
                                900, f"{path.name} to finish", interval=1.0)[0]
                if hist["status"].get("status_str") != "success":
                    failures.append(f"{path.name}: run failed: {hist['status'].get('messages')}")
                time.sleep(1.5)
            chrome.eval(FIT_JS)
            time.sleep(0.8)
            shot = args.out / f"{path.stem}.png"
            chrome.screenshot(shot)
            print(f"{path.name}: {'missing ' + str(missing) if missing else 'all nodes registered'} -> {shot}")
    finally:
        if chrome is not None:
            chrome.close()
        server.stop()
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
