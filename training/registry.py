"""`python -m training.registry list|show [VERSION]|register DIR|promote VERSION|rollback|
challenger VERSION --mode shadow|canary [--share S]|challenger --clear`: the model registry's
CLI (the registry itself is `scoring.registry`, MLflow's Model Registry at MODEL_REGISTRY_URL;
every scorer picks a change up within its reload interval)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from scoring.artifact import ArtifactError
from scoring.registry import MODES, Registry, RegistryError
from training.config import get_settings


# --- CLI ------------------------------------------------------------------------------------
def _role(state: dict[str, Any], version: str) -> str:
    if state["champion"] == version:
        return "champion"
    c = state["challenger"]
    if c and c["version"] == version:
        return f"{c['mode']} {c['share']:.0%}" if c["mode"] == "canary" else c["mode"]
    return "-"


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The model's own metrics: the first group when metrics are grouped by variant."""
    first = next(iter(metrics.values()), None)
    return first if isinstance(first, dict) else metrics


def _table(state: dict[str, Any]) -> str:
    rows = [("VERSION", "ROLE", "CREATED", "FEATURE SERVICE", "ROC-AUC", "PR-AUC")]
    for version, e in sorted(state["versions"].items()):
        m = _headline(e.get("metrics") or {})
        rows.append((version, _role(state, version), str(e.get("created_at") or "-")[:19],
                     str(e.get("feature_service") or "-"), f"{m['roc_auc']:.4f}" if "roc_auc" in m else "-",
                     f"{m['pr_auc']:.4f}" if "pr_auc" in m else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.registry",
                                description="the model registry (MLflow)")
    p.add_argument("--model-dir", type=Path, help="default: TRAINING_MODEL_DIR")
    p.add_argument("--registry-url", help="default: MODEL_REGISTRY_URL, else "
                   "sqlite:///MODEL_DIR/mlflow.db")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every version and its role")
    sub.add_parser("show", help="one version (default: the champion)").add_argument(
        "version", nargs="?")
    sub.add_parser("register", help="record an artifact directory").add_argument(
        "directory", type=Path)
    sub.add_parser("promote", help="verify and make champion").add_argument("version")
    sub.add_parser("rollback", help="return to the previous champion")
    ch = sub.add_parser("challenger", help="set (or --clear) the challenger")
    ch.add_argument("version", nargs="?")
    ch.add_argument("--mode", choices=MODES, default="shadow")
    ch.add_argument("--share", type=float, default=0.0, help="canary share of users, (0, 1]")
    ch.add_argument("--clear", action="store_true")
    return p


def _run(reg: Registry, a: argparse.Namespace) -> str:
    if a.command == "list":
        return _table(reg.state())
    if a.command == "show":
        state = reg.state()
        version = a.version or state["champion"]
        if version is None:
            raise RegistryError("the registry is empty")
        entry = {"version": version, "role": _role(state, version),
                 **reg.entry(version, state)}
        return json.dumps(entry, indent=2)
    if a.command == "register":
        version = reg.register(a.directory)
        return f"registered {version} ({_role(reg.state(), version)})"
    if a.command == "promote":
        previous = reg.promote(a.version)
        return f"champion: {a.version} (was {previous})"
    if a.command == "rollback":
        return f"champion: {reg.rollback()} (rolled back)"
    if a.clear:
        reg.clear_challenger()
        return "challenger cleared"
    if not a.version:
        raise RegistryError("challenger needs a VERSION or --clear")
    reg.set_challenger(a.version, a.mode, a.share)
    return f"challenger: {a.version} ({_role(reg.state(), a.version)})"


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    settings = get_settings()
    registry = Registry(a.model_dir or settings.model_dir,
                        a.registry_url or settings.model_registry_url)
    try:
        print(_run(registry, a))
    except (RegistryError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
