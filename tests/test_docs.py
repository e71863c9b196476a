"""The docs match the code: names they cite exist, every node and workflow is documented, nothing points outside.

Code is read by AST (never imported: the node pack imports the host's ``comfy_api``):

* every backticked code reference in README.md and docs/*.md exists: a call form ``name(...)`` / ``a.b(...)``,
  a dotted name rooted at one of our packages, modules or classes (``collab_core.models.load_pipeline``,
  ``models.demo_defaults``, ``DDIMSchedule.tail``), and every name in the "key names" column of
  docs/architecture.md's module tables;
* every node id the pack registers (``NODE_ID`` of the classes in the ``NODES`` lists of nodes/*.py, or a
  ``node_id="..."`` given to a schema) and every file in workflows/ is named in docs/comfyui.md;
* no doc, code or test points to documents outside the repository (the method notes the project was written
  from): what the code needs from them is stated in the project's own docs. The one outside path allowed is the
  default location of the golden test data, ``../shared/fixtures/reference`` ($CODIFF_REFERENCE_DIR overrides it).
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("collab_core", "nodes", "bench", "tools")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FILE_SUFFIXES = (".py", ".md", ".json", ".yaml", ".yml", ".ckpt", ".safetensors", ".png", ".pt", ".txt", ".toml",
                 ".jsonl", ".bin", ".pth", ".html", ".js")


# --- the code, by AST -----------------------------------------------------------------------------------------


class Module:
    def __init__(self, path: Path):
        self.path = path
        self.tree = ast.parse(path.read_text(), str(path))
        self.names: set[str] = set()  # module-level definitions, assignments and imports
        self.classes: dict[str, set[str]] = {}  # class name -> its members (methods, attributes, annotations)
        for node in self.tree.body:
            self.names |= _bound_names(node)
            self.names |= _lazy_exports(node)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ClassDef):
                members = self.classes.setdefault(node.name, set())
                for item in node.body:
                    members |= _bound_names(item)


def _lazy_exports(node: ast.AST) -> set[str]:
    """Names a package exports on first use (``_EXPORTS = {"module": ("name", ...)}`` read by ``__getattr__``)."""
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
        return {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return set()


def _bound_names(node: ast.AST) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, (ast.If, ast.Try)):
        out = set()
        for child in ast.iter_child_nodes(node):
            out |= _bound_names(child)
        return out
    return set()


@lru_cache(maxsize=None)
def modules() -> dict[str, Module]:
    """Dotted module name -> Module, for every .py under CODE_DIRS (packages as their __init__)."""
    out = {}
    for top in CODE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = Module(path)
    return out


def _defined_anywhere(name: str) -> bool:
    return any(name in m.names or name in m.classes or any(name in mem for mem in m.classes.values())
               for m in modules().values())


def _resolve_in(mod: Module, rest: list[str]) -> bool:
    if not rest:
        return True
    head = rest[0]
    if head in mod.classes:
        return len(rest) == 1 or (len(rest) == 2 and rest[1] in mod.classes[head])
    return len(rest) == 1 and head in mod.names


def resolves(ref: str) -> bool:
    """Does the code define ``ref`` (``name``, ``module.name``, ``pkg.module.name``, ``Class.member``)?"""
    parts = ref.split(".")
    mods = modules()
    if len(parts) == 1:
        return _defined_anywhere(parts[0]) or parts[0] in {k.rsplit(".", 1)[-1] for k in mods}
    for i in range(len(parts), 0, -1):  # the longest module prefix, full or by its last components
        prefix = ".".join(parts[:i])
        for name, mod in mods.items():
            if name == prefix or name.endswith("." + prefix):
                if _resolve_in(mod, parts[i:]):
                    return True
    classes = [m.classes[parts[0]] for m in mods.values() if parts[0] in m.classes]
    return len(parts) == 2 and any(parts[1] in members for members in classes)


def _is_rooted_in_our_code(dotted: str) -> bool:
    head = dotted.split(".")[0]
    mods = modules()
    return (head in CODE_DIRS or head in {k.rsplit(".", 1)[-1] for k in mods}
            or any(head in m.classes for m in mods.values()))


# --- the docs ---------------------------------------------------------------------------------------------------


def _text_without_fences(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


def _spans(text: str) -> list[str]:
    return [s.strip() for s in re.findall(r"`([^`\n]+)`", text)]


CALL = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\(.*\)(?:\s*->.*)?")
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
IDENT = re.compile(r"[A-Za-z_]\w*")
# Spans that look like code references but are not (with what they are).
NOT_CODE = {
    "sampling.x0_threshold": "a key of the demo bundle's demo.json",
}


def code_references(path: Path) -> list[str]:
    """The backticked spans of a doc that name code (see the module docstring)."""
    refs = []
    text = _text_without_fences(path)
    for span in _spans(text):
        if span in NOT_CODE:
            continue
        m = CALL.fullmatch(span)
        if m:
            name = m.group(1)
            # a bare CamelCase call outside the key-names column is as often a library's (``Linear(1024 → C)``)
            if ("." not in name and not name[0].isupper()) or ("." in name and _is_rooted_in_our_code(name)):
                refs.append(name)
        elif DOTTED.fullmatch(span) and not span.endswith(FILE_SUFFIXES) and _is_rooted_in_our_code(span):
            refs.append(span)
    if path.name == "architecture.md":  # the module tables: | file | what | key names |
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
            if len(cells) >= 3 and not set(cells[0]) <= set("-: "):
                for span in _spans(cells[-1]):
                    name = (CALL.fullmatch(span) or IDENT.fullmatch(span) or DOTTED.fullmatch(span))
                    if name is not None:
                        refs.append(name.group(1) if name.re is CALL else span)
    return sorted(set(refs))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_code_names_in_docs_exist(doc):
    missing = [r for r in code_references(doc) if not resolves(r)]
    assert missing == [], f"{doc.relative_to(ROOT)} names code that does not exist: {missing}"


def test_the_reference_check_can_fail():
    assert resolves("collab_core.models.load_pipeline") and resolves("models.load_pipeline")
    assert resolves("DDIMSchedule") and resolves("read_state_dict")
    assert not resolves("collab_core.models.load_branch") and not resolves("ddim_coefficients")
    assert not resolves("DDIMSchedule.no_such_member")
    fake = ROOT / "docs" / "architecture.md"
    assert "load_pipeline" in code_references(fake)


# --- nodes and workflows in docs/comfyui.md ----------------------------------------------------------------------


def node_ids() -> list[str]:
    """Every node id the pack registers: ``NODE_ID`` of each class listed in a module's ``NODES``, plus any
    ``node_id="..."`` literal given to a schema."""
    ids = set()
    for path in sorted((ROOT / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        listed = []
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NODES" for t in node.targets):
                if isinstance(node.value, (ast.List, ast.Tuple)):
                    listed += [e.id for e in node.value.elts if isinstance(e, ast.Name)]
        for cls_name in listed:
            cls = classes.get(cls_name)
            assert cls is not None, f"{path.name}: NODES lists {cls_name}, not a class of that module"
            for item in cls.body:
                if (isinstance(item, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NODE_ID" for t in item.targets)
                        and isinstance(item.value, ast.Constant)):
                    ids.add(item.value.value)
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "node_id" and isinstance(node.value, ast.Constant):
                ids.add(node.value.value)
    return sorted(i for i in ids if i)


def test_every_node_and_workflow_is_in_the_comfyui_doc():
    doc = (ROOT / "docs" / "comfyui.md").read_text()
    ids = node_ids()
    assert len(ids) >= 10, ids  # the AST scan found the pack's nodes
    undocumented = [i for i in ids if not re.search(rf"\b{re.escape(i)}\b", doc)]
    assert undocumented == [], f"docs/comfyui.md does not name the nodes {undocumented}"
    files = sorted(p.name for p in (ROOT / "workflows").iterdir() if p.is_file())
    assert files
    missing = [f for f in files if f not in doc]
    assert missing == [], f"docs/comfyui.md does not name the workflows/ files {missing}"


# --- nothing points outside the repository -------------------------------------------------------------------------

OUTSIDE = re.compile(r"shared/docs|reference-method|diffusers-mapping|comfyui-host|\.\./shared(?!/fixtures/reference)")


def _scanned_files() -> list[Path]:
    files = list(DOCS) + [ROOT / "pyproject.toml"]
    for top in (*CODE_DIRS, "tests", "workflows"):
        files += [p for p in sorted((ROOT / top).rglob("*")) if p.suffix in (".py", ".json", ".md", ".toml", ".yaml")]
    return [f for f in files if f.is_file() and f != Path(__file__).resolve()]


def test_nothing_points_to_documents_outside_the_repository():
    hits = []
    for f in _scanned_files():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert hits == [], "pointers outside the repository (state what is needed in our own words):\n" + "\n".join(hits)
