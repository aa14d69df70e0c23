"""`python -m devenv.layers`: print the import graph between the top-level packages and fail
(exit 1) on a cycle or on an import that points up the layers.

Layers, bottom to top; a package may import only from layers below its own:

    feature_repo            Feast definitions, the event contract, velocity, Feast plugins
    scoring                 the scoring core: artifacts, registry, scorer, prediction log, topics
    serving streaming training   the runtimes and jobs (never each other)
    devenv                  local infrastructure and the demo
    bench                   benchmarks

Every import counts, function-local ones included: a local import does not make a cycle go
away, it hides it.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

from feature_repo.config import PROJECT_DIR

LAYERS: tuple[tuple[str, ...], ...] = (
    ("feature_repo",),
    ("scoring",),
    ("serving", "streaming", "training"),
    ("devenv",),
    ("bench",),
)
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}

Edges = dict[str, dict[str, list[str]]]  # importer -> imported -> ["file:line", ...]


def import_graph(root: Path = PROJECT_DIR) -> Edges:
    """Which top-level package imports which, with where."""
    edges: Edges = defaultdict(lambda: defaultdict(list))
    for pkg in RANK:
        for path in sorted((root / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in RANK and top != pkg:
                        edges[pkg][top].append(f"{path.relative_to(root)}:{node.lineno}")
    return edges


def violations(edges: Edges) -> list[str]:
    """Imports that point up the layers or sideways within one (a cycle needs one of them)."""
    return [f"{pkg} -> {dep} ({where[0]})"
            for pkg, deps in edges.items() for dep, where in deps.items()
            if RANK[dep] >= RANK[pkg]]


def main(root: Path = PROJECT_DIR) -> int:
    edges = import_graph(root)
    for pkg in RANK:
        deps = sorted(edges.get(pkg, {}), key=RANK.__getitem__)
        print(f"{pkg:<13} -> {', '.join(deps) or '-'}")
    bad = violations(edges)
    for v in bad:
        print(f"layering violation: {v}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
