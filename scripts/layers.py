#!/usr/bin/env python3
"""The import graph of src/: prints every import that climbs a layer, and every circle
between files of different folders. Exits 1 when it finds any (CI runs it).

Layers, lowest first; a file may import its own layer and the layers below it:

    error.rs  <  base/  <  format/  <  crypt/  <  image/  <  guest/  <  jobs/  <  lib.rs, fuzzing.rs

The binary (src/bin/) is its own crate: it can reach only the library's public API.

Usage: scripts/layers.py [--graph]   (--graph also prints every file's imports)
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
ORDER = ["error", "base", "format", "crypt", "image", "guest", "jobs", "top"]
# Imports allowed to climb, each with the reason (keep this list short).
EXCEPTIONS = {
    # An error names the feature bits it refuses: FeatureName and FeatureKind are plain
    # types that import nothing, so no circle can form through them.
    ("error.rs", "format/feature.rs"): "Error::UnsupportedFeature carries FeatureName",
}


def layer_of(rel: str) -> str:
    if rel in ("lib.rs", "fuzzing.rs"):
        return "top"
    if rel == "error.rs":
        return "error"
    return rel.split("/", 1)[0] if "/" in rel else "top"


def module_files() -> dict:
    """Module path (tuple of names under `crate`) -> file, relative to src/."""
    modules = {}
    for path in SRC.rglob("*.rs"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("bin/"):
            continue
        parts = rel[:-3].split("/")
        if parts[-1] == "mod":
            parts = parts[:-1]
        if parts == ["lib"]:
            parts = []
        modules[tuple(parts)] = rel
    return modules


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(re.sub(r"//.*", "", line) for line in text.splitlines())


def test_free(text: str) -> str:
    """The file without its `#[cfg(test)] mod tests { ... }` block (tests may import
    anything)."""
    m = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
    if not m:
        return text
    depth = 0
    for i in range(m.end() - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[: m.start()] + test_free(text[i + 1 :])
    return text[: m.start()]


def crate_paths(text: str):
    """Every path that starts at `crate::`, expanded over `use crate::{a, b::{c}}` groups."""
    for m in re.finditer(r"\bcrate((?:::\w+)+)(::\{)?", text):
        head = tuple(p for p in m.group(1).split("::") if p)
        if m.group(2):
            start = m.end()
            depth = 1
            i = start
            while i < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            for inner in split_group(text[start : i - 1]):
                yield head + inner
        else:
            yield head


def split_group(body: str):
    depth = 0
    item = ""
    items = []
    for ch in body:
        if ch == "," and depth == 0:
            items.append(item)
            item = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        item += ch
    items.append(item)
    for it in items:
        it = re.sub(r"\s+", "", it)
        if not it:
            continue
        if "::{" in it:
            head, rest = it.split("::{", 1)
            for inner in split_group(rest[:-1]):
                yield tuple(head.split("::")) + inner
        else:
            yield tuple(p for p in it.split(" as ")[0].split("::") if p)


def root_exports(modules: dict) -> dict:
    """Names lib.rs re-exports (`pub use a::b::X`) -> the module path they come from, so
    that `crate::X` counts as an import of the file that defines X."""
    text = strip_comments((SRC / "lib.rs").read_text())
    out = {}
    for m in re.finditer(r"pub use ((?:\w+::)+)(\{[^}]*\}|\w+)( as \w+)?;", text):
        head = tuple(p for p in m.group(1).split("::") if p)
        names = re.findall(r"\w+", m.group(2))
        alias = m.group(3)
        for name in names:
            key = alias.split()[-1] if alias and len(names) == 1 else name
            out[key] = head
    return out


def target_file(path: tuple, modules: dict, exports: dict):
    """The file of the longest module prefix of `path` (through lib.rs's re-exports)."""
    if path and path[0] in exports:
        path = exports[path[0]] + path[1:]
    for n in range(len(path), -1, -1):
        if path[:n] in modules:
            return modules[path[:n]]
    return None


def circles(edges: dict) -> list:
    """The strongly connected components of more than one file (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    show = "--graph" in sys.argv
    modules = module_files()
    exports = root_exports(modules)
    edges = {}
    for mod, rel in sorted(modules.items(), key=lambda kv: kv[1]):
        text = test_free(strip_comments((SRC / rel).read_text()))
        targets = set()
        for path in crate_paths(text):
            target = target_file(path, modules, exports)
            if target and target != rel and target != "lib.rs":
                targets.add(target)
        edges[rel] = targets
    problems = []
    for rel, targets in sorted(edges.items()):
        if show:
            print(f"{rel}: {' '.join(sorted(targets))}")
        for target in sorted(targets):
            a, b = ORDER.index(layer_of(rel)), ORDER.index(layer_of(target))
            if b > a and (rel, target) not in EXCEPTIONS:
                problems.append(f"climbs: {rel} ({layer_of(rel)}) imports {target} ({layer_of(target)})")
    folder = lambda f: f.rsplit("/", 1)[0] if "/" in f else ""
    for group in circles(edges):
        if len({folder(f) for f in group}) > 1:
            problems.append(f"circle: {' -> '.join(group)}")
        else:
            print(f"note: circle inside {folder(group[0])}/: {' -> '.join(group)}")
    for name, why in EXCEPTIONS.items():
        print(f"allowed: {name[0]} imports {name[1]}: {why}")
    for p in problems:
        print(p)
    print(f"{len(edges)} files, {sum(map(len, edges.values()))} imports, {len(problems)} violations")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
