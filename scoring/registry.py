"""The model registry: MLflow's Model Registry, shared by every scorer, job and operator.

One registered model (`fraud_model`) holds a model version per artifact.  What serves is named
by two aliases: `champion` (answers requests) and optional `challenger` (`shadow`: scored on the
same traffic, never returned; `canary`: serves a deterministic share of users).  Each model
version carries tags written at registration: `artifact_version` (the artifact's own version,
the name every CLI and API call uses), `sha256` of model.joblib, `path` (the artifact directory,
relative to the model directory when inside it), `feature_service`, `created_at` and `metrics`.
The registered model's tags hold the canary share (`challenger`: JSON version/mode/share) and
the champions in promotion order (`lineage`), which `rollback` walks back.

The registry lives at `MODEL_REGISTRY_URL`: by default `sqlite:///<model_dir>/mlflow.db` (one
box), `postgresql+psycopg://...` for a fleet (docker-compose.yml), or an MLflow server's
`http(s)://` address.  The artifacts stay on the (shared, read-only) model volume; the registry
records where they are and what their hash must be (the client and the URL's forms:
`scoring.registry_client`).

Guarantees:
* the aliases are the authority: a change made through MLflow's own UI or API
  (`set_registered_model_alias`) counts like one made here; a promotion done there joins the
  lineage at the next promotion or rollback made here;
* `promote` and `challenger` unpickle nothing they have not verified: the artifact's sha256 must
  match both its metadata and the registered hash;
* versions are immutable: a second registration of a version with another hash is refused;
  concurrent registrations of one version keep the first MLflow version (the others are
  deleted), and exactly one first version becomes champion;
* alias changes are single atomic MLflow calls; the lineage tag is last-writer-wins when two
  promotions race (rollback then follows the winner's view).

The CLI is `python -m training.registry` (training/registry.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from scoring.artifact import ArtifactError, load_artifact, read_metadata, sha256_file
from scoring.registry_client import mlflow_client, redacted, sqlite_file, with_connect_timeout

if TYPE_CHECKING:
    from mlflow import MlflowClient

MODEL_NAME = "fraud_model"
REGISTRY_DB = "mlflow.db"
CHAMPION, CHALLENGER = "champion", "challenger"
LINEAGE_TAG, CHALLENGER_TAG = "lineage", "challenger"
MAX_LINEAGE = 100  # champions remembered for rollback
Mode = Literal["shadow", "canary"]
MODES: tuple[Mode, ...] = ("shadow", "canary")


class RegistryError(RuntimeError):
    """The registry is unreachable or invalid, or the requested change is not allowed."""


class UnknownVersion(RegistryError):
    """The version is not registered."""


@dataclass(frozen=True)
class ChallengerSpec:
    version: str
    mode: Mode
    share: float  # canary: fraction of users (by user_id hash) served by the challenger


def default_url(model_dir: Path) -> str:
    """The single-box registry: SQLite next to the artifacts."""
    return f"sqlite:///{model_dir.resolve() / REGISTRY_DB}"


def _code(exc: BaseException) -> str | None:
    """MLflow's error code of `exc` (RESOURCE_DOES_NOT_EXIST, ...), if it has one."""
    return getattr(exc, "error_code", None)


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(
        timespec="seconds")


def _metrics(tag: str | None) -> Any:
    try:
        return json.loads(tag) if tag else {}
    except json.JSONDecodeError:
        return {}  # informational only


def _capped(lineage: list[str]) -> str:
    """The lineage tag: the most recent champions that fit MLflow's 5,000-character tag."""
    kept = lineage[-MAX_LINEAGE:]
    while len(json.dumps(kept)) > 4000:
        kept = kept[1:]
    return json.dumps(kept)


def _json_tag(tags: dict[str, str], key: str, kind: type) -> Any:
    if key not in tags:
        return None
    try:
        value = json.loads(tags[key])
    except json.JSONDecodeError as exc:
        raise RegistryError(f"registered model tag {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, kind):
        raise RegistryError(f"registered model tag {key!r} is not a JSON {kind.__name__}")
    return value


def check_consistent(state: dict[str, Any]) -> dict[str, Any]:
    """`state` if what it names can serve, else RegistryError: the champion and the challenger
    are versions with a recorded path and sha256 (a version registered through MLflow by hand,
    without them, is refused, not guessed at)."""
    roles = [("champion", state["champion"])]
    if state["challenger"] is not None:
        roles.append(("challenger", state["challenger"]["version"]))
    for role, version in roles:
        if version is None:
            continue
        entry = state["versions"].get(version)
        if entry is None:
            raise RegistryError(f"the {role} {version!r} is not a registered version")
        if not entry.get("path") or not entry.get("sha256"):
            raise RegistryError(
                f"the {role} {version!r} (MLflow version {entry['mlflow_version']}) has no "
                "recorded path and sha256: register artifacts with python -m training.registry")
    return state


class Registry:
    """Read and change the registered model `name` at `url` (default: SQLite in model_dir)."""

    def __init__(self, model_dir: Path, url: str | None = None, name: str = MODEL_NAME) -> None:
        self.model_dir = model_dir
        self.url = with_connect_timeout(url or default_url(model_dir))
        self.name = name
        self._file = sqlite_file(self.url)

    def __repr__(self) -> str:
        return f"Registry({redacted(self.url)}, {self.name!r})"

    def client(self, create: bool = False) -> MlflowClient:
        """The MLflow client; RegistryError if the registry does not answer.  Readers never
        create a SQLite registry (`create` is for writers)."""
        if self._file is not None and not create and not self._file.is_file():
            raise RegistryError(f"the model registry {redacted(self.url)} does not exist")
        if self._file is not None:
            self._file.parent.mkdir(parents=True, exist_ok=True)
        try:
            return mlflow_client(self.url)
        except Exception as exc:  # noqa: BLE001 - driver, network and MLflow errors alike
            raise RegistryError(
                f"model registry {redacted(self.url)} unreachable: {type(exc).__name__}: {exc}"
            ) from exc

    # --- reading --------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether the registered model exists (RegistryError if the registry is unreachable)."""
        if self._file is not None and not self._file.is_file():
            return False
        return self._registered_model() is not None

    def _registered_model(self) -> Any:
        client = self.client()
        try:
            return client.get_registered_model(self.name)
        except Exception as exc:  # noqa: BLE001 - MLflow's and the database's errors alike
            if _code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise RegistryError(f"model registry {redacted(self.url)} unreadable: "
                                f"{type(exc).__name__}: {exc}") from exc

    def _rows(self) -> list[tuple[int, dict[str, str], int | None]]:
        """(MLflow version, tags, creation time in ms) of every version, oldest first."""
        try:
            found = self.client().search_model_versions(f"name='{self.name}'")
        except Exception as exc:  # noqa: BLE001
            raise RegistryError(f"model registry {redacted(self.url)} unreadable: "
                                f"{type(exc).__name__}: {exc}") from exc
        return sorted((int(mv.version), dict(mv.tags), mv.creation_timestamp) for mv in found)

    def state(self) -> dict[str, Any]:
        """champion, challenger ({version, mode, share}), versions (artifact version -> its
        record) and lineage; an empty registry if the registered model does not exist."""
        empty: dict[str, Any] = {"champion": None, "challenger": None, "versions": {},
                                 "lineage": []}
        if self._file is not None and not self._file.is_file():
            return empty
        model = self._registered_model()
        if model is None:
            return empty
        versions: dict[str, dict[str, Any]] = {}
        by_number: dict[int, str] = {}
        for number, tags, created in self._rows():
            key = tags.get("artifact_version") or f"mlflow-{number}"
            by_number[number] = key
            if key in versions:  # a racing duplicate: the first MLflow version stands
                if versions[key]["sha256"] != tags.get("sha256"):
                    raise RegistryError(f"version {key!r} is registered twice with different "
                                        "hashes (MLflow versions "
                                        f"{versions[key]['mlflow_version']} and {number})")
                continue
            versions[key] = {
                "mlflow_version": number, "path": tags.get("path"),
                "sha256": tags.get("sha256"), "created_at": tags.get("created_at") or None,
                "registered_at": _iso(created), "feature_service": tags.get("feature_service"),
                "metrics": _metrics(tags.get("metrics")),
            }
        aliases = {alias: int(v) for alias, v in dict(model.aliases).items()}
        tags = dict(model.tags)
        champion = by_number.get(aliases[CHAMPION]) if CHAMPION in aliases else None
        challenger = None
        tried = aliases.get(CHALLENGER)
        if tried is not None and by_number.get(tried) not in (None, champion):
            spec = _json_tag(tags, CHALLENGER_TAG, dict) or {}
            version = by_number[tried]
            mode, share = (spec.get("mode", "shadow"), spec.get("share", 0.0)) \
                if spec.get("version") == version else ("shadow", 0.0)
            if mode not in MODES:
                raise RegistryError(f"the challenger's mode {mode!r} is not one of {MODES}")
            challenger = {"version": version, "mode": mode, "share": float(share)}
        lineage = [str(v) for v in _json_tag(tags, LINEAGE_TAG, list) or []]
        return {"champion": champion, "challenger": challenger, "versions": versions,
                "lineage": lineage}

    def path_of(self, version: str, state: dict[str, Any] | None = None) -> Path:
        """Artifact directory of a registered version (recorded relative to model_dir)."""
        return self.model_dir / self.entry(version, state)["path"]

    def challenger(self, state: dict[str, Any] | None = None) -> ChallengerSpec | None:
        c = (self.state() if state is None else state)["challenger"]
        return None if c is None else ChallengerSpec(c["version"], c["mode"], float(c["share"]))

    def entry(self, version: str, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """The registration record of `version`."""
        state = self.state() if state is None else state
        try:
            return cast(dict[str, Any], state["versions"][version])
        except KeyError:
            raise UnknownVersion(f"version {version!r} is not registered in "
                                 f"{redacted(self.url)}") from None

    # --- writing --------------------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> Any:
        """One MLflow write, its errors as RegistryError."""
        try:
            return getattr(self.client(create=True), method)(*args)
        except RegistryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise RegistryError(f"model registry {redacted(self.url)}: {method} failed: "
                                f"{type(exc).__name__}: {exc}") from exc

    def _ensure_model(self) -> None:
        client = self.client(create=True)
        try:
            client.create_registered_model(
                self.name, description="fraudstream models: aliases champion and challenger "
                "name what serves (scoring/registry.py)")
        except Exception as exc:  # noqa: BLE001
            if _code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise RegistryError(f"model registry {redacted(self.url)}: {exc}") from exc

    def register(self, directory: Path) -> str:
        """Record an artifact (hash checked, nothing unpickled); return its version.

        The first version registered becomes the champion.  Idempotent for the same version
        and hash; a different hash under a registered version is refused.
        """
        directory = directory.resolve()
        meta = read_metadata(directory)
        actual = sha256_file(directory / meta.get("model_file", "model.joblib"))
        if actual != meta["sha256"]:
            raise ArtifactError(f"{directory}: model file does not match its metadata sha256")
        version = str(meta["version"])
        self._ensure_model()
        old = self.state()["versions"].get(version)
        if old is not None:
            if old["sha256"] != actual:
                raise RegistryError(f"version {version} is already registered with another hash")
            return version
        root = self.model_dir.resolve()
        tags = {"artifact_version": version, "sha256": actual,
                "path": str(directory.relative_to(root) if directory.is_relative_to(root)
                            else directory),
                "feature_service": str(meta["feature_service"]),
                "created_at": str(meta.get("created_at") or ""),
                "metrics": json.dumps(meta.get("metrics", {}))}
        mine = int(self._call("create_model_version", self.name, directory.as_uri(), None,
                              tags).version)
        rows = self._rows()
        number, first = next((n, t) for n, t, _ in rows if t.get("artifact_version") == version)
        if number != mine:  # registered concurrently: the first MLflow version stands
            self._call("delete_model_version", self.name, str(mine))
            if first.get("sha256") != actual:
                raise RegistryError(f"version {version} is already registered with another hash")
        model = self._registered_model()
        if model is not None and CHAMPION not in dict(model.aliases) \
                and not _json_tag(dict(model.tags), LINEAGE_TAG, list):
            # the first version registered becomes champion; racing registrants agree on it
            number, tags = next((n, t) for n, t, _ in rows if t.get("sha256") and t.get("path"))
            self._call("set_registered_model_alias", self.name, CHAMPION, str(number))
            self._call("set_registered_model_tag", self.name, LINEAGE_TAG,
                       json.dumps([tags["artifact_version"]]))
        return version

    def verify(self, version: str, state: dict[str, Any] | None = None) -> Path:
        """Load the artifact (sha256 vs metadata and vs registration); return its directory."""
        entry = self.entry(version, state)
        if not entry.get("path") or not entry.get("sha256"):
            raise RegistryError(f"version {version!r} has no recorded path and sha256")
        path = self.model_dir / entry["path"]
        artifact = load_artifact(path, expected_sha256=entry["sha256"])
        if artifact.version != version:
            raise ArtifactError(f"artifact at {path} is not the registered version {version}")
        return path

    def _set_champion(self, state: dict[str, Any], version: str, lineage: list[str]) -> None:
        number = str(state["versions"][version]["mlflow_version"])
        self._call("set_registered_model_alias", self.name, CHAMPION, number)
        self._call("set_registered_model_tag", self.name, LINEAGE_TAG, _capped(lineage))
        if state["challenger"] and state["challenger"]["version"] == version:
            self.clear_challenger()  # the challenger won

    def promote(self, version: str) -> str | None:
        """Make a verified version the champion; return the previous champion."""
        state = self.state()
        self.verify(version, state)
        previous = cast(str | None, state["champion"])
        if previous == version:
            raise RegistryError(f"{version} is already the champion")
        lineage = list(state["lineage"])
        if previous is not None and (not lineage or lineage[-1] != previous):
            lineage.append(previous)  # promoted through MLflow directly: remembered now
        self._set_champion(state, version, [*lineage, version])
        return previous

    def rollback(self) -> str:
        """Return to the (verified) champion before the current one; return it."""
        state = self.state()
        lineage = list(state["lineage"])
        if lineage and lineage[-1] == state["champion"]:
            lineage.pop()
        if not lineage:
            raise RegistryError("no previous champion to roll back to")
        target = lineage[-1]
        self.verify(target, state)
        self._set_champion(state, target, lineage)
        return target

    def set_challenger(self, version: str, mode: Mode, share: float = 0.0) -> None:
        """Try a verified version next to the champion (`shadow`, or `canary` for `share`)."""
        if mode not in MODES:
            raise RegistryError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == "canary" and not 0.0 < share <= 1.0:
            raise RegistryError("a canary share must lie in (0, 1]")
        state = self.state()
        self.verify(version, state)
        if state["champion"] == version:
            raise RegistryError(f"{version} is the champion")
        spec = {"version": version, "mode": mode, "share": share if mode == "canary" else 0.0}
        self._call("set_registered_model_tag", self.name, CHALLENGER_TAG, json.dumps(spec))
        self._call("set_registered_model_alias", self.name, CHALLENGER,
                   str(state["versions"][version]["mlflow_version"]))

    def clear_challenger(self) -> None:
        """Remove the challenger alias and its mode (nothing to do if there is none)."""
        model = self._registered_model()
        if model is None:
            return
        if CHALLENGER in dict(model.aliases):
            self._call("delete_registered_model_alias", self.name, CHALLENGER)
        if CHALLENGER_TAG in dict(model.tags):
            self._call("delete_registered_model_tag", self.name, CHALLENGER_TAG)
