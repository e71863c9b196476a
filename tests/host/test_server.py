"""A real headless ComfyUI server on loopback with the pack: node list, served workflows, each workflow queued
end to end, HTTP validation errors, interrupt.

The workflows in workflows/ are UI-format files (as the front end saves them). They are converted to the API
prompt with the server's /object_info (``ui_to_api``), checked against the front end's own conversion saved by
tools/screenshot_workflows.py --export-api (tests/host/workflows_api/), pointed at the tiny fixture
checkpoints, made small (64 px, 4 steps) and queued.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from hostutil import COMFY, OFFICIAL_TO_FIXTURE, REPO, combo_options

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
API_TWINS = Path(__file__).resolve().parent / "workflows_api"
PACK = "comfyui-collaborative-diffusion"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
DEMO_FILES = {p.name for p in (REPO / "collab_core" / "demo").glob("*.safetensors")}


def http(url, data=None, timeout=30):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_for(fn, timeout, what, interval=0.25):
    end = time.time() + timeout
    while time.time() < end:
        try:
            v = fn()
            if v:
                return v
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def server(fixture_dir):
    if not COMFY:
        pytest.skip("COMFYUI_PATH is not set")
    base = Path(tempfile.mkdtemp(prefix="collab-server-"))
    (base / "custom_nodes").mkdir()
    (base / "input").mkdir()
    os.symlink(REPO, base / "custom_nodes" / PACK)  # loaded like any pack cloned into custom_nodes
    for png in (REPO / "workflows").glob("*.png"):
        shutil.copy(png, base / "input" / png.name)
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(f"collab_fixtures:\n    collaborative_diffusion: {fixture_dir / 'pretrained'}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)  # ComfyUI's environment (default: this one)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--extra-model-paths-config", str(yaml),
                             "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--disable-metadata"],
                            cwd=COMFY, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http(url + "/system_stats", timeout=2)[0] == 200, 120, "server start")
        yield type("S", (), {"url": url, "base": base, "log": base / "server.log", "proc": proc})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def object_info(server):
    status, info = http(server.url + "/object_info", timeout=60)
    assert status == 200
    return info


# ----------------------------------------------------------------------------------------------- UI → API


def _is_widget(spec) -> bool:
    typ = spec[0]
    return isinstance(typ, list) or typ in WIDGET_TYPES


def ui_to_api(wf: dict, object_info: dict) -> dict:
    """The API prompt of a UI-format workflow (what the front end's graphToPrompt makes of it)."""
    links = {l[0]: l for l in wf["links"]}
    prompt = {}
    for node in wf["nodes"]:
        cls = node["type"]
        if cls not in object_info or node.get("mode", 0) in (2, 4):
            continue  # Note nodes are front-end only; muted/bypassed nodes are not queued
        info = object_info[cls]
        order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs, pos = {}, 0
        for name in order.get("required", []) + order.get("optional", []):
            spec = specs[name]
            if _is_widget(spec):
                if pos >= len(values):  # a widget added after the workflow was saved: the front end's default
                    break
                value = values[pos]
                pos += 1
                opts = spec[1] if len(spec) > 1 else {}
                if opts.get("control_after_generate"):
                    pos += 1
                if opts.get("image_upload"):
                    pos += 1
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": cls, "inputs": inputs}
    return prompt


def uses_demo_bundle(prompt: dict) -> bool:
    return any(n["inputs"].get(k) in DEMO_FILES for n in prompt.values() for k in ("ckpt_name", "vae_name"))


def small_fixture_prompt(prompt: dict) -> dict:
    """Point a shipped workflow at the tiny fixture checkpoints and make it quick (64 px, 4 steps). A workflow on
    the pack's demo bundle runs as shipped: its models are tiny already, and they are what a user gets."""
    out = json.loads(json.dumps(prompt))
    if uses_demo_bundle(out):
        return out
    for n in out.values():
        i = n["inputs"]
        for key in ("ckpt_name", "vae_name"):
            if key in i:
                assert i[key] in OFFICIAL_TO_FIXTURE, f"workflow expects an unknown checkpoint {i[key]}"
                i[key] = OFFICIAL_TO_FIXTURE[i[key]]
        if n["class_type"] in ("EmptyLatentImage", "ImageScale"):
            i.update(width=64, height=64)
        if "steps" in i and isinstance(i["steps"], int):
            i["steps"] = 4
    for nid, n in list(out.items()):  # pictures loaded from files: scale to 64 px before they are VAE-encoded
        src = n["inputs"].get("pixels")
        if n["class_type"] == "VAEEncode" and isinstance(src, list):
            out[f"{nid}_small"] = {"class_type": "ImageScale", "inputs": {"image": src, "upscale_method": "area",
                                                                          "width": 64, "height": 64, "crop": "center"}}
            n["inputs"]["pixels"] = [f"{nid}_small", 0]
    return out


def queue(server, prompt: dict, client_id: str | None = None):
    return http(server.url + "/prompt", {"prompt": prompt, "client_id": client_id or str(uuid.uuid4())})


def wait_history(server, pid: str, timeout: float = 300) -> dict:
    def done():
        status, hist = http(f"{server.url}/history/{pid}")
        entry = hist.get(pid) if status == 200 and hist else None
        return entry if entry and entry.get("status", {}).get("completed") is not None else None

    try:
        return wait_for(done, timeout, f"prompt {pid}", interval=0.5)
    except TimeoutError:
        http(server.url + "/queue", {"clear": True})  # do not leave it blocking the next tests
        http(server.url + "/interrupt", {})
        raise


# ----------------------------------------------------------------------------------------------- tests


def test_server_lists_every_node(server, object_info):
    from test_nodes_inprocess import EXPECTED

    for name, display in EXPECTED.items():
        assert name in object_info, f"{name} missing from /object_info (see {server.log})"
        assert object_info[name]["display_name"] == display
        assert object_info[name]["category"] == "collaborative_diffusion"
    combo = combo_options(object_info["CollabUnimodalLoader"]["input"]["required"]["ckpt_name"])
    assert "tiny_codiff_mask_text.ckpt" in combo


def test_workflows_are_served_as_example_workflows(server):
    status, templates = http(server.url + "/workflow_templates")
    assert status == 200
    assert sorted(templates.get(PACK, [])) == sorted(p.stem for p in WORKFLOWS)
    for p in WORKFLOWS:
        status, served = http(f"{server.url}/api/workflow_templates/{PACK}/{p.name}")
        assert status == 200 and served == json.loads(p.read_text())


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_each_workflow_runs_end_to_end(server, object_info, path):
    wf = json.loads(path.read_text())
    missing = sorted({n["type"] for n in wf["nodes"]} - set(object_info) - {"Note", "MarkdownNote"})
    assert not missing, f"{path.name}: missing nodes {missing}"
    prompt = ui_to_api(wf, object_info)
    twin = API_TWINS / path.name
    if twin.is_file():  # the front end's own conversion, exported by tools/screenshot_workflows.py
        front = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in json.loads(twin.read_text()).items()}
        assert prompt == front, f"{path.name}: our UI→API conversion differs from the front end's"
    status, body = queue(server, small_fixture_prompt(prompt))
    assert status == 200, body
    entry = wait_history(server, body["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    saved = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert saved, f"{path.name} saved no image"
    for img in saved:
        f = server.base / "output" / img["subfolder"] / img["filename"]
        assert f.is_file() and f.stat().st_size > 0


def test_missing_checkpoint_is_an_http_400_naming_node_and_fix(server, object_info):
    prompt = ui_to_api(json.loads((REPO / "workflows" / "text_only.json").read_text()), object_info)
    status, body = queue(server, prompt)  # official names: not installed on the test server
    assert status == 400
    errs = {nid: e for nid, e in body["node_errors"].items() if e["class_type"] == "CollabUnimodalLoader"}
    assert errs, body
    msg = json.dumps(errs)
    assert "512_text.ckpt" in msg and "not found" in msg and "collaborative_diffusion" in msg


def test_interrupt_stops_a_running_prompt(server, object_info):
    prompt = small_fixture_prompt(ui_to_api(json.loads((REPO / "workflows" / "collaborative_mask_and_text.json")
                                                       .read_text()), object_info))
    for n in prompt.values():
        if n["class_type"] == "CollabKSampler":
            n["inputs"].update(steps=500, seed=12345)  # long enough to be caught while running
        if n["class_type"] == "EmptyLatentImage":
            n["inputs"].update(width=128, height=128)
    status, body = queue(server, prompt)
    assert status == 200, body
    pid = body["prompt_id"]

    def running():
        _, q = http(server.url + "/queue")
        return any(item[1] == pid for item in q.get("queue_running", []))

    wait_for(running, 60, "the prompt to start")
    time.sleep(3.0)
    t0 = time.time()
    assert http(server.url + "/interrupt", {})[0] == 200
    entry = wait_history(server, pid, timeout=60)
    stopped_after = time.time() - t0
    events = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in events, events
    assert stopped_after < 10, f"took {stopped_after:.1f}s to stop"
