"""Local model registry: which artifact versions exist, which one serves, which one is tried.

`<model_dir>/registry.json` records every registered version (path, sha256 pinned at
registration, created_at, feature service, metrics), the champion the scorer serves, an
optional challenger (`shadow`: scored on the same traffic, never returned; `canary`: serves a
deterministic share of users) and the promotion history.  The champion is derived from that
history (promotions push, rollbacks pop), so `rollback` always returns to the champion that
preceded the current one.

Guarantees: writers serialise on an `fcntl` lock (`registry.json.lock`) and replace the file
atomically (temp file + `os.replace`), so readers never see a partial file and concurrent
writers never lose an update.  `promote` and `challenger` unpickle nothing they have not
verified: the artifact's sha256 must match both its metadata and the registered hash.

The CLI is `python -m training.registry` (training/registry.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

from scoring.artifact import ArtifactError, load_artifact, read_metadata, sha256_file

REGISTRY_FILE = "registry.json"
Mode = Literal["shadow", "canary"]
MODES: tuple[Mode, ...] = ("shadow", "canary")


class RegistryError(RuntimeError):
    """The registry file is invalid or the requested change is not allowed."""


class UnknownVersion(RegistryError):
    """The version is not registered."""


@dataclass(frozen=True)
class ChallengerSpec:
    version: str
    mode: Mode
    share: float  # canary: fraction of users (by user_id hash) served by the challenger


def registry_file(model_dir: Path) -> Path:
    return model_dir / REGISTRY_FILE


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _empty() -> dict[str, Any]:
    return {"champion": None, "challenger": None, "versions": {}, "history": []}


def lineage(state: dict[str, Any]) -> list[str]:
    """Champions in promotion order, replayed from the history; the last one serves."""
    stack: list[str] = []
    for event in state["history"]:
        if event["action"] in ("register", "promote"):
            stack.append(event["version"])
        elif event["action"] == "rollback" and stack:
            stack.pop()
    return stack


def check_consistent(state: dict[str, Any]) -> dict[str, Any]:
    """`state` if what it says is servable, else RegistryError: every version has a path and a
    sha256, the champion is registered and is where the history leads, the challenger is
    registered.  A registry edited by hand into any other shape is refused, not guessed at."""
    for version, entry in state["versions"].items():
        if not isinstance(entry, dict) or not entry.get("path") or not entry.get("sha256"):
            raise RegistryError(f"version {version!r} has no recorded path and sha256")
    champion, chain = state["champion"], lineage(state)
    if champion is not None and champion not in state["versions"]:
        raise RegistryError(f"the champion {champion!r} is not a registered version")
    if champion != (chain[-1] if chain else None):
        raise RegistryError(f"the champion {champion!r} is not where the promotion history "
                            f"leads ({chain[-1] if chain else None!r})")
    challenger = state["challenger"]
    if challenger is not None and (not isinstance(challenger, dict)
                                   or challenger.get("version") not in state["versions"]):
        raise RegistryError(f"the challenger {challenger!r} is not a registered version")
    return state


class Registry:
    """Read and change `<model_dir>/registry.json`; every change is one locked transaction."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.path = registry_file(model_dir)

    # --- reading --------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.is_file()

    def state(self) -> dict[str, Any]:
        """The current registry (an empty one if the file does not exist)."""
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return _empty()
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{self.path} is not valid JSON: {exc}") from exc
        if not isinstance(state, dict) or not {"versions", "history"} <= state.keys():
            raise RegistryError(f"{self.path} is not a model registry")
        return {**_empty(), **state}

    def path_of(self, version: str, state: dict[str, Any] | None = None) -> Path:
        """Artifact directory of a registered version (recorded relative to model_dir)."""
        entry = self.entry(version, state)
        return self.model_dir / entry["path"]

    def challenger(self, state: dict[str, Any] | None = None) -> ChallengerSpec | None:
        c = (self.state() if state is None else state)["challenger"]
        return None if c is None else ChallengerSpec(c["version"], c["mode"], float(c["share"]))

    def entry(self, version: str, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """The registration record of `version`."""
        state = self.state() if state is None else state
        try:
            return cast(dict[str, Any], state["versions"][version])
        except KeyError:
            raise UnknownVersion(f"version {version!r} is not registered") from None

    # --- writing --------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[dict[str, Any]]:
        """Lock, read, let the caller change the state, write it atomically on success."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(REGISTRY_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.state()
                yield state
                chain = lineage(state)
                state["champion"] = chain[-1] if chain else None
                self._write(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, state: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.model_dir, prefix=".registry-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def register(self, directory: Path) -> str:
        """Record an artifact (hash checked, nothing unpickled); return its version.

        The first version registered becomes the champion.

        Idempotent for the same version and hash; a different hash under a registered version
        is refused (versions are immutable).
        """
        directory = directory.resolve()
        meta = read_metadata(directory)
        actual = sha256_file(directory / meta.get("model_file", "model.joblib"))
        if actual != meta["sha256"]:
            raise ArtifactError(f"{directory}: model file does not match its metadata sha256")
        version = str(meta["version"])
        root = self.model_dir.resolve()
        entry = {
            "path": str(directory.relative_to(root) if directory.is_relative_to(root) else directory),
            "sha256": actual,
            "created_at": meta.get("created_at"),
            "registered_at": _now(),
            "feature_service": meta["feature_service"],
            "metrics": meta.get("metrics", {}),
        }
        with self._transaction() as state:
            old = state["versions"].get(version)
            if old is not None:
                if old["sha256"] != actual:
                    raise RegistryError(f"version {version} is already registered with another hash")
                return version
            state["versions"][version] = entry
            if not lineage(state):
                state["history"].append({"at": _now(), "action": "register", "version": version,
                                         "previous": None})
        return version

    def verify(self, version: str, state: dict[str, Any] | None = None) -> Path:
        """Load the artifact (sha256 vs metadata and vs registration); return its directory."""
        entry = self.entry(version, state)
        path = self.model_dir / entry["path"]
        artifact = load_artifact(path, expected_sha256=entry["sha256"])
        if artifact.version != version:
            raise ArtifactError(f"artifact at {path} is not the registered version {version}")
        return path

    def promote(self, version: str) -> str | None:
        """Make a verified version the champion; return the previous champion."""
        self.verify(version)
        with self._transaction() as state:
            self.entry(version, state)
            previous = state["champion"]
            if previous == version:
                raise RegistryError(f"{version} is already the champion")
            state["history"].append({"at": _now(), "action": "promote", "version": version,
                                     "previous": previous})
            if state["challenger"] and state["challenger"]["version"] == version:
                state["challenger"] = None  # the challenger won
        return cast(str | None, previous)

    def rollback(self) -> str:
        """Return to the (verified) champion before the current one; return it."""
        chain = lineage(self.state())
        if len(chain) < 2:
            raise RegistryError("no previous champion to roll back to")
        self.verify(chain[-2])
        with self._transaction() as state:
            if lineage(state) != chain:
                raise RegistryError("the registry changed during the rollback: retry")
            current, target = chain[-1], chain[-2]
            state["history"].append({"at": _now(), "action": "rollback", "version": target,
                                     "previous": current})
            if state["challenger"] and state["challenger"]["version"] == target:
                state["challenger"] = None
        return target

    def set_challenger(self, version: str, mode: Mode, share: float = 0.0) -> None:
        """Try a verified version next to the champion (`shadow`, or `canary` for `share`)."""
        if mode not in MODES:
            raise RegistryError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == "canary" and not 0.0 < share <= 1.0:
            raise RegistryError("a canary share must lie in (0, 1]")
        self.verify(version)
        with self._transaction() as state:
            self.entry(version, state)
            if state["champion"] == version:
                raise RegistryError(f"{version} is the champion")
            state["challenger"] = {"version": version, "mode": mode,
                                   "share": share if mode == "canary" else 0.0}

    def clear_challenger(self) -> None:
        with self._transaction() as state:
            state["challenger"] = None
