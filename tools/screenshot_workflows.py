#!/usr/bin/env python3
"""Open ComfyUI's real front end in headless Chromium, load each workflow of workflows/, save a screenshot.

    COMFYUI_PATH=/path/to/ComfyUI python tools/screenshot_workflows.py [--python VENV/bin/python]
        [--models DIR | --fixture-models REFERENCE_DIR] [--run] [--normalize] [--export-api DIR]
        [--out docs/screenshots] [--report FILE] [--only STEM ...] [--pack DIR] [--timeout S]

It starts a headless ComfyUI server on loopback with this pack as a custom node (isolated: a temporary base
directory, in-memory database), starts Chromium with a fresh profile, and drives the page through the Chrome
DevTools protocol. For each workflow it checks that every node type is registered in the front end (no missing
nodes), optionally queues it from the page (--run; needs checkpoints under --models, which may hold the
official files or any files with the official names), and writes a PNG.

--normalize writes each workflow back as the front end serialises it (app.graph.serialize()), with node sizes
computed by the front end and columns spread so nodes do not overlap. --export-api writes the prompt the front
end would queue (app.graphToPrompt()) to DIR/<name>.json; the host tests compare their own conversion with it.

Checks per workflow: node types the front end does not know (missing), nodes drawn red (flagged with errors, or a
combo value the server does not list, such as an absent checkpoint), and with --run whether the prompt ran to the
end and how long it took (from the page's queue call to the history entry). --report FILE writes these results
with the host and front-end versions as JSON. The script stops early, with the server log's tail, when the pack
itself did not import. --pack DIR loads another copy of the pack (e.g. a `git archive HEAD` export while the
work tree is being edited).

Front ends: tested with 1.27.10 (ComfyUI 0.3.64), 1.47.10 (0.29.0) and 1.49.6 (0.33.0). The page is driven
through window.app / window.LiteGraph (still globals in 1.49; READY_JS falls back to window.comfyAPI),
app.loadGraphData, app.graphToPrompt and app.queuePrompt (falling back to the Comfy.QueuePrompt command).

--fixture-models: the tiny test VAE halves the picture (the official one divides by 8), so for the run only the
ImageScale nodes are set to 64 px (edit_mask_and_text fits its photo to 512 px, which would mean a 256x256
latent and many GB of attention); the screenshot shows the shipped values. --run-set overrides this.

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

    def __init__(self, comfy: Path, python: str, models: Path | None, inputs: list[Path], threads: int = 1,
                 pack: Path = REPO):
        self.base = Path(tempfile.mkdtemp(prefix="collab-shots-"))
        (self.base / "custom_nodes").mkdir()
        (self.base / "input").mkdir()
        os.symlink(pack, self.base / "custom_nodes" / PACK_DIR_NAME)
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


SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True,
            "Comfy.Workflow.ShowMissingModelsWarning": False, "Comfy.Workflow.ShowMissingNodesWarning": False,
            "Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 1,
            "Comfy.Toast.DisableReconnectingToast": True, "Comfy.Notification.ShowVersionUpdates": False}

# The page's app and LiteGraph: globals up to the 1.4x front ends, also reachable through window.comfyAPI; the
# helpers below always go through window.app / window.LiteGraph, so READY_JS makes sure both exist.
READY_JS = r"""
(() => {
  const api = window.comfyAPI || {};
  const native = !!window.app;
  if (!window.app && api.app && api.app.app) window.app = api.app.app;
  if (!window.LiteGraph && api.litegraph && api.litegraph.LiteGraph) window.LiteGraph = api.litegraph.LiteGraph;
  const ok = !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph &&
                Object.keys(LiteGraph.registered_node_types).length > 100);
  return ok && (native ? 'window.app' : 'window.comfyAPI.app.app');
})()
"""

# Close dialogs, toasts and side panels the front end may open on load (templates, missing models, release notes).
CLOSE_JS = r"""
(() => {
  const sel = ['.p-dialog-mask .p-dialog-close-button', '.p-dialog-header-close', '.p-toast-close-button',
               '.p-toast-icon-close'];
  document.querySelectorAll(sel.join(',')).forEach(b => b.click());
  return true;
})()
"""

# Nodes in the graph, node types the front end does not know, and nodes drawn red: flagged with errors, or a
# combo widget whose value is not among its options (a checkpoint or mask name the server does not list).
CHECK_JS = r"""
(() => {
  const nodes = app.graph._nodes || app.graph.nodes;
  const reg = LiteGraph.registered_node_types;
  const missing = nodes.filter(n => !reg[n.type]).map(n => n.type);
  const bad = [];
  for (const n of nodes) {
    if (n.has_errors) bad.push(`${n.type}#${n.id}: has errors`);
    for (const w of n.widgets || []) {
      if (w.type !== 'combo') continue;
      let vals = w.options && w.options.values;
      if (typeof vals === 'function') { try { vals = vals(w, n); } catch (e) { vals = null; } }
      if (Array.isArray(vals) && vals.length && !vals.includes(w.value))
        bad.push(`${n.type}#${n.id}.${w.name} = ${JSON.stringify(w.value)} not listed`);
    }
  }
  return {nodes: nodes.length, missing, bad};
})()
"""

# Queue the graph the way the Run button does.
QUEUE_JS = r"""
(async () => {
  if (typeof app.queuePrompt === 'function') { await app.queuePrompt(0, 1); return 'app.queuePrompt'; }
  await app.extensionManager.command.execute('Comfy.QueuePrompt');
  return 'Comfy.QueuePrompt';
})()
"""

# What the front end reports when it refuses a prompt: node errors, or the text of an error dialog.
ERRORS_JS = r"""
(() => {
  const errs = app.lastNodeErrors && Object.keys(app.lastNodeErrors).length ? JSON.stringify(app.lastNodeErrors) : '';
  const dlg = [...document.querySelectorAll('.p-dialog, .comfy-modal')].filter(d => d.offsetParent !== null)
    .map(d => d.innerText.trim()).filter(t => t).join(' | ');
  return errs || dlg.slice(0, 2000) || null;
})()
"""


# Widget values for the run only: [[node type, widget name, value], ...] -> [[id, type, name, old, new], ...].
SET_WIDGETS_JS = r"""
((sets) => {
  const changed = [];
  for (const n of app.graph._nodes || app.graph.nodes)
    for (const [type, name, value] of sets) {
      const w = n.type === type && (n.widgets || []).find(w => w.name === name);
      if (w) { changed.push([n.id, n.type, name, w.value, value]); w.value = value; }
    }
  app.graph.setDirtyCanvas(true, true);
  return changed;
})(%s)
"""

RESTORE_WIDGETS_JS = r"""
((olds) => {
  for (const [id, name, value] of olds) {
    const n = app.graph.getNodeById(id);
    const w = n && (n.widgets || []).find(w => w.name === name);
    if (w) w.value = value;
  }
  app.graph.setDirtyCanvas(true, true);
  return true;
})(%s)
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
    # Over 60 lines: a tool script: options, then one server and browser session driven step by step.
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout ($COMFYUI_PATH)")
    ap.add_argument("--python", default=sys.executable, help="Python of ComfyUI's environment")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    ap.add_argument("--models", type=Path, help="folder for models/collaborative_diffusion (files with official names)")
    ap.add_argument("--fixture-models", type=Path, metavar="REFERENCE_DIR",
                    help="use the tiny test checkpoints of REFERENCE_DIR (../shared/fixtures/reference) under the "
                         "official names")
    ap.add_argument("--pack", type=Path, default=REPO,
                    help="pack folder the server loads (default: this checkout; e.g. a `git archive HEAD` copy)")
    ap.add_argument("--workflows", type=Path, default=REPO / "workflows")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    ap.add_argument("--run", action="store_true", help="queue each workflow from the page and wait for it")
    ap.add_argument("--normalize", action="store_true", help="write workflows back as the front end saves them")
    ap.add_argument("--export-api", type=Path, help="write the front end's API prompt of each workflow here")
    ap.add_argument("--size", default="2560x1440")
    ap.add_argument("--only", nargs="*", help="workflow stems to process")
    ap.add_argument("--run-set", nargs="*", default=[], metavar="TYPE.WIDGET=VALUE",
                    help="widget values set in the page for the run only (set back before the screenshot); with "
                         "--fixture-models the default is ImageScale.width=64 ImageScale.height=64")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one run may take (with --run)")
    ap.add_argument("--report", type=Path, help="write the measured results (versions, per workflow) as JSON here")
    args = ap.parse_args(argv)
    if not args.comfy:
        ap.error("give --comfy or set COMFYUI_PATH")
    width, height = (int(v) for v in args.size.split("x"))
    flows = sorted(p for p in args.workflows.glob("*.json") if not args.only or p.stem in args.only)
    inputs = sorted(args.workflows.glob("*.png"))
    args.out.mkdir(parents=True, exist_ok=True)
    run_set = [(t, w, json.loads(v) if v[:1] in "0123456789-[{\"" or v in ("true", "false") else v)
               for t, _, rest in (item.partition(".") for item in args.run_set) for w, _, v in [rest.partition("=")]]
    if args.fixture_models:
        args.models = fixture_models(args.fixture_models.resolve())
        if not args.run_set:  # the tiny fixture VAE halves (the official one divides by 8): 64 px pictures
            run_set = [("ImageScale", "width", 64), ("ImageScale", "height", 64)]
    server = Server(Path(args.comfy), args.python, args.models, inputs, pack=args.pack.resolve())
    chrome = None
    failures = []
    results = []
    info = {}
    try:
        object_info = http_json(server.url + "/object_info")
        pack_types = sorted(k for k, v in object_info.items() if PACK_DIR_NAME in str(v.get("python_module", "")))
        if not pack_types:
            log = (server.base / "server.log").read_text(errors="replace")
            raise RuntimeError("the pack did not load in ComfyUI (no node of it in /object_info); server log tail:\n"
                               + "\n".join(log.splitlines()[-40:]))
        stats = http_json(server.url + "/system_stats")
        info["host"] = stats.get("system", {}).get("comfyui_version")
        info["pack_node_types"] = len(pack_types)
        http_json(server.url + "/api/settings", SETTINGS)
        chrome = Chrome(args.chromium, width, height)
        chrome.send("Page.enable")
        chrome.send("Page.navigate", url=server.url + "/")
        info["app_global"] = wait_for(lambda: chrome.eval(READY_JS), 120, "the ComfyUI front end")
        time.sleep(2)
        chrome.eval(CLOSE_JS)
        info["frontend"] = chrome.eval("window.__COMFYUI_FRONTEND_VERSION__ || null")
        print(f"ComfyUI {info['host']}, front end {info['frontend']}, {len(pack_types)} pack node types")
        for path in flows:
            wf = json.loads(path.read_text())
            row = {"workflow": path.name}
            chrome.eval(f"app.loadGraphData({json.dumps(wf)}, true, true, {json.dumps(path.stem)}).then(() => true)")
            time.sleep(1.0)
            chrome.eval(CLOSE_JS)
            check = chrome.eval(CHECK_JS)
            row.update(nodes=check["nodes"], missing=len(check["missing"]), red=check["bad"])
            if check["missing"]:
                failures.append(f"{path.name}: missing node types {check['missing']}")
            if check["bad"]:
                failures.append(f"{path.name}: red nodes / invalid widget values {check['bad']}")
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
                changed = chrome.eval(SET_WIDGETS_JS % json.dumps(run_set)) if run_set else []
                if changed:
                    row["run_set"] = [f"{t}#{i}.{w} = {v!r}" for i, t, w, _old, v in changed]
                t0 = time.time()
                queued = row["queued_by"] = chrome.eval(QUEUE_JS)
                problem = None

                def finished():
                    nonlocal problem
                    new = [v for k, v in http_json(server.url + "/history").items()
                           if k not in before and v.get("status", {}).get("completed") is not None]
                    if new:
                        return new
                    # nothing in the history yet: did the front end refuse the prompt (red nodes, error dialog)?
                    errs = chrome.eval(ERRORS_JS)
                    busy = http_json(server.url + "/queue")
                    if errs and not (busy.get("queue_running") or busy.get("queue_pending")):
                        problem = errs
                        return [None]
                    return None

                try:
                    hist = wait_for(finished, args.timeout, f"{path.name} to finish", interval=1.0)[0]
                except TimeoutError:
                    hist = {"status": {"status_str": "timeout"}}
                    http_json(server.url + "/interrupt", {})
                    log = (server.base / "server.log").read_text(errors="replace").splitlines()
                    print(f"{path.name}: no result after {args.timeout} s; server log tail:\n" + "\n".join(log[-25:]),
                          file=sys.stderr)
                    wait_for(lambda: not any(http_json(server.url + "/queue").values()), 120, "the interrupt")
                row["seconds"] = round(time.time() - t0, 1)
                if hist is None:
                    row["ran"] = False
                    failures.append(f"{path.name}: not queued ({queued}): {problem}")
                elif hist["status"].get("status_str") != "success":
                    row["ran"] = False
                    errs = [m[1] for m in hist["status"].get("messages", []) if m[0] == "execution_error"]
                    failures.append(f"{path.name}: run failed: " + "; ".join(
                        f"{e.get('node_type')}: {e.get('exception_type')}: {e.get('exception_message')}"
                        for e in errs) if errs else f"{path.name}: run failed: {hist['status']}")
                else:
                    row["ran"] = True
                    row["outputs"] = len(hist.get("outputs", {}))
                time.sleep(1.5)
                if changed:  # the picture shows the workflow as shipped
                    chrome.eval(RESTORE_WIDGETS_JS % json.dumps([[i, w, old] for i, _t, w, old, _v in changed]))
                chrome.eval(CLOSE_JS)
                red = chrome.eval(CHECK_JS)["bad"]
                if red:
                    row["red"] = red
                    failures.append(f"{path.name}: red nodes after the run {red}")
            chrome.eval(FIT_JS)
            time.sleep(0.8)
            shot = args.out / f"{path.stem}.png"
            chrome.screenshot(shot)
            results.append(row)
            state = ("missing " + str(check["missing"])) if check["missing"] else "all nodes registered"
            ran = "" if "ran" not in row else f", ran {'ok' if row['ran'] else 'FAILED'} in {row['seconds']} s"
            print(f"{path.name}: {row['nodes']} nodes, {state}, {len(row['red'])} red{ran} -> {shot}", flush=True)
    finally:
        if chrome is not None:
            chrome.close()
        server.stop()
        if args.fixture_models:
            shutil.rmtree(args.models, ignore_errors=True)  # symlinks only
        if args.report:
            args.report.write_text(json.dumps({**info, "workflows": results, "failures": failures}, indent=2) + "\n")
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
