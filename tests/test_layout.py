"""The shape of the codebase, checked from source text alone (AST and regexes): nothing is imported, so it needs
neither torch nor a GPU and runs in about a second.

1. No import cycles among `picochat` modules, counting imports inside functions: an import moved into a function
   hides a cycle from the interpreter, not from the design.
2. Layer rules (below, `FORBIDDEN`): the core and `ops/` never reach up into stages, evals, serving or tools; a stage
   imports no other stage except the shared `stages/chat.py`.
3. The README's file map names every module, and no README table row names a file that does not exist.
4. The flag counts of the pretrain and chat-stage configs are pinned (`FLAG_COUNTS`).
5. No tracked text carries work-log vocabulary or paths outside the repository.

Dynamic imports through `importlib.import_module("picochat....")` are not edges: the CLI's dispatch table is the
one place that names every command module, and it does so by string on purpose (a command's imports load only when
that command runs).
"""

from __future__ import annotations

import ast
import re
import subprocess
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "picochat"

# A new flag is a product decision: raise the number here in the same commit (and say why in its message).
# Counted as the dataclass fields a leaf config ends up with, its dataclass bases included.
FLAG_COUNTS = {
    "pretrain": 51,  # PretrainConfig
    "midtrain": 30,  # MidtrainConfig
    "sft": 30,  # SFTConfig
    "rl": 28,  # RLConfig
}
LEAF_CONFIGS = {"pretrain": "PretrainConfig", "midtrain": "MidtrainConfig", "sft": "SFTConfig", "rl": "RLConfig"}

# Layer rules: (importer's layer, imported layer) pairs that are forbidden. Layers are the subpackage names; "core"
# is a module directly under picochat/. data/ sits below evaluation (evals read data, never the reverse); serving
# runs trained models and needs no training stage; tools may import anything.
UPPER = ("stages", "evals", "serving", "tools")
FORBIDDEN = {
    "core": set(UPPER),
    "ops": set(UPPER),
    "data": set(UPPER),
    "evals": {"stages", "serving", "tools"},
    "stages": {"serving", "tools"},
    "serving": {"stages", "tools"},
}
SHARED_STAGE_MODULE = "picochat.stages.chat"  # the one stage module other stages may import

# Work-log vocabulary and paths outside the repository. Each pattern is checked against the tree: plain "session"
# (a POSIX session, setsid) and "round" (rounding) are ordinary words, so only their numbered forms count; words
# like "today" and "yesterday" appear in the synthetic corpus and prompts, so they are not patterns at all. The
# patterns are spelled so that this file does not match itself.
TEXT_PATTERNS = {
    "numbered session": r"\bsessions?[ -]\d+",
    "per-session history": r"\bsession[ -]by[ -]session\b",
    "session or round named relative to now": r"\b(?:this|last|previous|next|earlier|later) (?:session|round)\b",
    "numbered round": r"\brounds? \d+\b",
    "work-log period": r"\bwork[ -]periods?\b",
    "path to a sibling folder": r"\.\./shared\b",
    "outside data folder": r"(?<![\w/.-])shared/dat[a]\b",
    "absolute path of the work machine": r"/w[o]rk/",
    # /root/picochat is the repository's own path inside the Modal container (launch/modal_app.py)
    "absolute path under /root": r"/r[o]ot/(?!picochat\b)",
}
# The history log may say "measured on an H200", never which work session measured it.
LOG_ONLY_PATTERNS = {"session": r"\bsessions?\b"}
LOG_FILE = "docs/LOG.md"
# A markdown file named in the text must be one of the repository's own; these are outputs picochat writes.
GENERATED_MD = {"report.md"}

TEXT_SCOPE_DIRS = ("picochat/", "tests/", "launch/", "docs/", ".ci/")
TEXT_SCOPE_FILES = {"README.md", "ARCHITECTURE.md", "run.sh", "pyproject.toml"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".sbatch", ".html", ".js", ".txt", ".json"}


# ----------------------------------------------------------------------------------------------------------------
# Source index


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py")) if "__pycache__" not in p.parts}


@lru_cache(maxsize=None)
def tree(name: str) -> ast.Module:
    path = modules()[name]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(name: str) -> str:
    return modules()[name].relative_to(REPO).as_posix()


def layer(name: str) -> str:
    """The subpackage a module belongs to ("ops", "stages", ...), or "core" for a module directly under picochat/."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and (PKG / parts[1]).is_dir() else "core"


def _resolve(dotted: str) -> str | None:
    """The longest prefix of `dotted` that is a picochat module (a package resolves to its __init__)."""
    parts = dotted.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules():
            return cand
        parts.pop()
    return None


def _base_package(importer: str, level: int) -> str:
    """The package a relative import of `level` dots is relative to."""
    is_pkg = modules()[importer].name == "__init__.py"
    parts = importer.split(".")
    drop = level - 1 if is_pkg else level
    return ".".join(parts[: len(parts) - drop]) if drop else importer


def imports(importer: str) -> list[tuple[str, int]]:
    """(imported picochat module, line) for every import statement in the module, at any depth (functions,
    conditionals, TYPE_CHECKING blocks included). `from picochat.pkg import mod` names picochat.pkg.mod when that
    file exists, else picochat.pkg."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree(importer)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "picochat" or alias.name.startswith("picochat."):
                    target = _resolve(alias.name)
                    if target:
                        found.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _base_package(importer, node.level)
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod != "picochat" and not mod.startswith("picochat."):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                target = sub if sub in modules() else _resolve(mod)
                if target:
                    found.append((target, node.lineno))
    return sorted(set(found), key=lambda x: (x[1], x[0]))  # `from m import a, b` is one edge, one line


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


@lru_cache(maxsize=None)
def import_graph() -> dict[str, dict[str, int]]:
    """importer -> {imported module: first line}. Importing a.b.c also runs the __init__ of a.b and a, so those are
    edges too (except the importer's own packages, which are always initialised before it)."""
    graph: dict[str, dict[str, int]] = {m: {} for m in modules()}
    for m in modules():
        own = _ancestors(m)
        for target, line in imports(m):
            for t in [target, *sorted(_ancestors(target) - own)]:
                if t != m and t in modules():
                    graph[m].setdefault(t, line)
    return graph


# ----------------------------------------------------------------------------------------------------------------
# 1. Import cycles


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _cycle_through(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first within the component)."""
    start, members = comp[0], set(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for t in sorted(graph[node]):
                if t == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if t in members and t not in parent:
                    parent[t] = node
                    nxt_frontier.append(t)
        frontier = nxt_frontier
    return comp


def test_no_import_cycles():
    graph = import_graph()
    problems = []
    for comp in _strongly_connected(graph):
        members = set(comp)
        edges = [f"{_rel(a)}:{line} imports {b}" for a in comp for b, line in sorted(graph[a].items())
                 if b in members]
        problems.append(f"cycle: {' -> '.join(_cycle_through(graph, comp))}; every import among "
                        f"{', '.join(comp)}:\n    " + "\n    ".join(edges))
    assert not problems, "import cycles (imports inside functions count):\n  " + "\n  ".join(problems)


# ----------------------------------------------------------------------------------------------------------------
# 2. Layer rules


def test_layer_rules():
    problems = []
    for m in sorted(modules()):
        src = layer(m)
        for target, line in imports(m):
            dst = layer(target)
            if dst in FORBIDDEN.get(src, ()):
                problems.append(f"{_rel(m)}:{line}: imports {target} ({src} may not import {dst})")
            elif (src == dst == "stages" and target != m and target != SHARED_STAGE_MODULE
                  and target != "picochat.stages" and m != SHARED_STAGE_MODULE):
                problems.append(f"{_rel(m)}:{line}: imports {target} (a stage imports no other stage except "
                                f"{SHARED_STAGE_MODULE})")
            elif m == SHARED_STAGE_MODULE and dst == "stages" and target not in (m, "picochat.stages"):
                problems.append(f"{_rel(m)}:{line}: imports {target} (the shared chat module imports no stage)")
    assert not problems, "layer rule violations:\n  " + "\n  ".join(problems)


# ----------------------------------------------------------------------------------------------------------------
# 3. README file map

README_PATH = re.compile(r"(?<![\w./~-])((?:picochat|launch|tests|docs)/[\w./-]*)")


def _table_rows(text: str) -> list[tuple[int, str]]:
    return [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.lstrip().startswith("|")]


def _is_plumbing(name: str) -> bool:
    """A package's __init__/__main__ that defines nothing (a docstring, a version, a call into the CLI)."""
    if modules()[name].name not in ("__init__.py", "__main__.py"):
        return False
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return not any(isinstance(n, defs) for n in ast.walk(tree(name)))


def test_readme_file_map_names_every_module():
    rows = _table_rows((REPO / "README.md").read_text(encoding="utf-8"))
    named = {p.rstrip(".") for _, row in rows for p in README_PATH.findall(row)}
    missing = [_rel(m) for m in sorted(modules()) if not _is_plumbing(m) and _rel(m) not in named]
    assert not missing, ("modules missing from the README file map (a table row must name each by its full path):"
                         "\n  " + "\n  ".join(missing))


def test_readme_table_rows_name_existing_files():
    problems = []
    for i, row in _table_rows((REPO / "README.md").read_text(encoding="utf-8")):
        for p in README_PATH.findall(row):
            p = p.rstrip(".")
            if not (REPO / p).exists():
                problems.append(f"README.md:{i}: {p}")
    assert not problems, "README table rows name files that do not exist:\n  " + "\n  ".join(problems)


# ----------------------------------------------------------------------------------------------------------------
# 4. Flag counts


def _is_dataclass(cls: ast.ClassDef) -> bool:
    for d in cls.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        name = d.id if isinstance(d, ast.Name) else d.attr if isinstance(d, ast.Attribute) else None
        if name == "dataclass":
            return True
    return False


def _own_fields(cls: ast.ClassDef) -> list[str]:
    out = []
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if "ClassVar" not in ast.unparse(node.annotation):
                out.append(node.target.id)
    return out


@lru_cache(maxsize=None)
def _classes() -> dict[str, list[tuple[str, ast.ClassDef]]]:
    """Class name -> [(module, node)] over the whole package (top-level classes)."""
    out: dict[str, list[tuple[str, ast.ClassDef]]] = {}
    for m in modules():
        for node in tree(m).body:
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, []).append((m, node))
    return out


def _find_class(name: str, near: str) -> tuple[str, ast.ClassDef]:
    """The class called `name`: in module `near` first, then in stages/, then anywhere in the package."""
    cands = _classes().get(name, [])
    for rank in (lambda m: m == near, lambda m: m.startswith("picochat.stages."), lambda m: True):
        hits = [c for c in cands if rank(c[0])]
        if len(hits) == 1:
            return hits[0]
        assert len(hits) < 2, f"class {name} is defined in several modules: {[h[0] for h in hits]}"
    raise AssertionError(f"class {name} (a config base of a stage) not found in picochat/")


def effective_fields(name: str, near: str = "picochat.stages") -> list[str]:
    """The fields a dataclass ends up with: its dataclass bases' fields (in MRO-like order), then its own; a field
    redeclared in a subclass (a new default) counts once."""
    module, cls = _find_class(name, near)
    fields: list[str] = []
    for base in cls.bases:
        base_name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
        if base_name and base_name not in ("object", "Generic"):
            fields += [f for f in effective_fields(base_name, module) if f not in fields]
    if _is_dataclass(cls):
        fields += [f for f in _own_fields(cls) if f not in fields]
    return fields


STAGE_FUNCTION_LINES = 80  # a stage reads top to bottom: setup, then a loop short enough to see at once


def test_stage_functions_are_short():
    long = []
    for path in sorted((PKG / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > STAGE_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} is {n} lines")
    assert not long, f"functions in stages/ over {STAGE_FUNCTION_LINES} lines:\n  " + "\n  ".join(long)


def test_flag_counts_are_pinned():
    counts = {stage: len(effective_fields(cls)) for stage, cls in LEAF_CONFIGS.items()}
    changed = {s: f"{FLAG_COUNTS[s]} -> {n}" for s, n in counts.items() if n != FLAG_COUNTS[s]}
    assert not changed, (f"config flag counts changed: {changed}. A new flag is a product decision: update "
                         f"FLAG_COUNTS in tests/test_layout.py in the same commit (a removed one lowers the pin)")


# ----------------------------------------------------------------------------------------------------------------
# 5. Work-log vocabulary and outside paths


def _in_scope(path: str) -> bool:
    if path in TEXT_SCOPE_FILES:
        return True
    if not path.startswith(TEXT_SCOPE_DIRS):
        return False
    return path.startswith(".ci/") or Path(path).suffix in TEXT_SUFFIXES


@lru_cache(maxsize=None)
def tracked_texts() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist): walk the tree
        files = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if p.is_file()
                 and "__pycache__" not in p.parts and ".git" not in p.parts]
    return sorted(f for f in files if _in_scope(f) and (REPO / f).is_file())


def test_no_work_log_vocabulary_or_outside_paths():
    patterns = {what: re.compile(p, re.IGNORECASE) for what, p in TEXT_PATTERNS.items()}
    log_patterns = {**patterns, **{what: re.compile(p, re.IGNORECASE) for what, p in LOG_ONLY_PATTERNS.items()}}
    own_md = {Path(f).name for f in tracked_texts() if f.endswith(".md")} | GENERATED_MD | {Path(LOG_FILE).name}
    md_name = re.compile(r"[\w-][\w.-]*\.md\b")
    hits = []
    for f in tracked_texts():
        try:
            text = (REPO / f).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found = []
        for what, pat in (log_patterns if f == LOG_FILE else patterns).items():
            found += [(m.start(), m.group(0), what) for m in pat.finditer(text)]
        found += [(m.start(), m.group(0), "a markdown file outside the repository") for m in md_name.finditer(text)
                  if m.group(0).rsplit("/", 1)[-1].lstrip(".") not in own_md]
        for pos, match, what in sorted(found):
            hits.append(f"{f}:{text.count(chr(10), 0, pos) + 1}: {match!r} ({what})")
    assert not hits, ("tracked text with work-log vocabulary or paths outside the repository (describe the project "
                      "as it is; cite public sources):\n  " + "\n  ".join(hits))
