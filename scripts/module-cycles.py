#!/usr/bin/env python3
"""The import graph of src/ and its cycles: between the crate's top-level modules, and between
the files of one module (a file is the module it defines: src/comm/pair.rs is comm::pair).

    scripts/module-cycles.py [--graph] [--code-only]

Reads `crate::`, `super::` and `self::` paths in every file, unit tests (`#[cfg(test)] mod`)
left out (and comments, doc links included, with --code-only); prints each cycle (a strongly connected set of modules, with the edges that close
it) and exits 1 if there is one. `--graph` prints every edge as well.
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return rel


def without_tests(text):
    # Unit tests sit at the end of a file, in `#[cfg(test)] mod tests { ... }`. Doc links
    # count (a reader follows them as an import) unless --code-only.
    m = re.search(r"^#\[cfg\(test\)\]\s*\nmod \w+ \{", text, re.M)
    text = text[: m.start()] if m else text
    return re.sub(r"//.*", "", text) if "--code-only" in sys.argv else text


def files():
    for root, _, names in os.walk(SRC):
        for n in names:
            if n.endswith(".rs") and not (root == SRC and n == "main.rs"):
                yield os.path.join(root, n)


def resolve(mod, is_dir_module, segments):
    """Absolute module path of a `crate::`, `super::` or `self::` path used in `mod`."""
    base = list(mod) if is_dir_module else list(mod[:-1])
    if segments[0] == "crate":
        return segments[1:]
    out = list(mod)
    while segments and segments[0] in ("super", "self"):
        if segments[0] == "super":
            out = out[:-1]
        segments = segments[1:]
    del base
    return out + segments


def main():
    known = {tuple(module_of(f)) for f in files()}
    edges = {}
    for f in files():
        mod = tuple(module_of(f))
        text = without_tests(open(f).read())
        # `use a::{b, c::d}` groups: expand one level of braces.
        paths = []
        for m in re.finditer(r"\b((?:crate|super|self)(?:::\w+)*)(?:::\{([^}]*)\})?", text):
            head = m.group(1).split("::")
            if m.group(2):
                for item in m.group(2).split(","):
                    item = item.strip().split(" as ")[0]
                    if item:
                        paths.append(head + item.split("::"))
            else:
                paths.append(head)
        for p in paths:
            target = resolve(mod, f.endswith("mod.rs"), p)
            # The longest known module that the path names.
            while target and tuple(target) not in known:
                target = target[:-1]
            target = tuple(target)
            if target and target != mod and target != mod[: len(target)]:
                edges.setdefault(mod, set()).add(target)
    graphs = {}
    # Top-level: a -> b when a file under a uses something under b.
    top = {}
    for a, bs in edges.items():
        for b in bs:
            if a[0] != b[0]:
                top.setdefault((a[0],), set()).add((b[0],))
    graphs["top-level modules"] = top
    # Within a module: between its direct children (files and sub-folders).
    for parent in sorted({m[:-1] for m in known if len(m) > 1}):
        g = {}
        for a, bs in edges.items():
            for b in bs:
                if len(a) > len(parent) and len(b) > len(parent) and a[: len(parent)] == parent == b[: len(parent)]:
                    ca, cb = a[: len(parent) + 1], b[: len(parent) + 1]
                    if ca != cb:
                        g.setdefault(ca, set()).add(cb)
        graphs["within " + "::".join(parent)] = g
    found = 0
    for name, g in graphs.items():
        if "--graph" in sys.argv:
            for a in sorted(g):
                print(f"{name}: {'::'.join(a)} -> {', '.join('::'.join(b) for b in sorted(g[a]))}")
        for scc in sccs(g):
            if len(scc) > 1:
                found += 1
                names = sorted("::".join(m) for m in scc)
                print(f"cycle ({name}): {' <-> '.join(names)}")
                for a in sorted(scc):
                    for b in sorted(g.get(a, ())):
                        if b in scc:
                            print(f"    {'::'.join(a)} -> {'::'.join(b)}")
    print(f"{found} cycle(s)")
    return 1 if found else 0


def sccs(g):
    """Tarjan's strongly connected components."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    nodes = set(g) | {b for bs in g.values() for b in bs}

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
