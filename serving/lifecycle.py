"""Swapping the served models without a restart.

`ModelManager.current` is the one reference handlers read.  A reload (the admin API, or the
poller noticing that the model registry changed: an alias, a tag or a version, whoever made it:
the CLI, another replica's admin API, MLflow's UI or API) builds and verifies a complete new
`ModelSet` in a worker thread, then replaces `current` in one assignment on the event loop.

Guarantees: a request that has read `current` finishes on that model set; a model set that fails
verification (hash, registration, feature service), or a registry that is missing, empty,
unreachable, unreadable or inconsistent (scoring/loader.py: fail closed), is refused with an
ERROR log, `fraud_model_registry_ok` 0, and the old set keeps serving; reloads are serialised,
so two admin calls never interleave.  The poller reads the registry every
`SERVING_RELOAD_INTERVAL_S` (two small queries) and retries a refused state only once what it
reads changes again; a registry that stops answering counts as such a change (refused: 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from feast import FeatureStore
from prometheus_client import Gauge

from scoring.loader import RegistryState, build_model_set, open_store
from scoring.metrics import retire
from scoring.models import ModelSet
from scoring.registry import Registry, RegistryError
from scoring.registry_client import redacted
from serving import metrics
from serving.config import ServingSettings

log = logging.getLogger("serving.lifecycle")
Signature = str  # what the registry said (or the error it gave), as one comparable string


class ModelManager:
    def __init__(self, settings: ServingSettings, store: FeatureStore, models: ModelSet) -> None:
        self.settings = settings
        self.store = store
        self.registry = Registry(settings.model_dir, settings.model_registry_url)
        self.current = models
        self.loaded_at = datetime.now(UTC)
        self.last_error: str | None = None
        self._seen = self._signature()
        self._lock = asyncio.Lock()
        # called on the event loop with each new model set, right after it is swapped in
        self.listeners: list[Callable[[ModelSet], None]] = []
        self._publish(None, models)
        metrics.REGISTRY_OK.set(1)

    @classmethod
    def start(cls, settings: ServingSettings) -> ModelManager:
        """Open the feature store and load the first model set (blocking, at start-up)."""
        store = open_store(settings)
        return cls(settings, store, build_model_set(settings, store))

    def _read(self) -> tuple[Signature, RegistryState]:
        """The registry's current state and its signature (blocking: run it off the loop)."""
        try:
            state: RegistryState = self.registry.state()
        except RegistryError as exc:
            return f"error: {exc}", exc
        return json.dumps(state, sort_keys=True, default=str), state

    def _signature(self) -> Signature:
        return self._read()[0]

    async def reload(self, only_if_changed: bool = False) -> ModelSet:
        """Build, verify and swap in the model set the registry now describes.

        Raises ArtifactError (the old set keeps serving) if it must not serve.
        """
        async with self._lock:
            seen, state = await asyncio.to_thread(self._read)
            if only_if_changed and seen == self._seen:
                return self.current
            try:
                new = await asyncio.to_thread(build_model_set, self.settings, self.store, state)
            except Exception as exc:
                self._seen, self.last_error = seen, str(exc)
                metrics.MODEL_RELOADS.labels("refused").inc()
                metrics.REGISTRY_OK.set(0)
                log.error("model reload refused, keeping %s: %s",
                          self.current.champion.artifact.version, exc)
                raise
            old, self.current = self.current, new
            self._seen, self.last_error = seen, None
            metrics.REGISTRY_OK.set(1)
            self.loaded_at = datetime.now(UTC)
            self._publish(old, new)
            for listener in self.listeners:
                try:
                    listener(new)
                except Exception:  # noqa: BLE001 - the swap happened; a listener can't undo it
                    log.exception("model swap listener failed")
            metrics.MODEL_RELOADS.labels("ok").inc()
            log.info("models reloaded", extra={"fields": new.describe()})
            return new

    async def promote(self, version: str) -> ModelSet:
        """Verify and promote `version` in the registry, then reload."""
        await asyncio.to_thread(self.registry.promote, version)
        return await self.reload()

    async def rollback(self) -> ModelSet:
        """Return the registry to the previous champion, then reload."""
        await asyncio.to_thread(self.registry.rollback)
        return await self.reload()

    async def poll(self) -> None:
        """Reload whenever the registry changes; every `reload_interval_s` seconds, forever."""
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            if await asyncio.to_thread(self._signature) == self._seen:
                continue
            with contextlib.suppress(Exception):  # logged by reload; keep polling
                await self.reload(only_if_changed=True)

    async def status(self) -> dict[str, Any]:
        registry: dict[str, Any]
        try:
            registry = await asyncio.to_thread(self.registry.state)
        except RegistryError as exc:
            registry = {"error": str(exc)}
        registry["url"] = redacted(self.registry.url)
        return {
            "serving": self.current.describe(),
            "loaded_at": self.loaded_at.isoformat(),
            "last_error": self.last_error,
            "reload_interval_s": self.settings.reload_interval_s,
            "registry": registry,
        }

    @staticmethod
    def _publish(old: ModelSet | None, new: ModelSet) -> None:
        """Point the info gauges at the new set."""
        if old is not None:
            _info(old, present=False)
        _info(new, present=True)

    def close(self) -> None:
        """Remove this process's info series (at shutdown)."""
        _info(self.current, present=False)


def _info(models: ModelSet, present: bool) -> None:
    series: list[tuple[Gauge, tuple[str, ...]]] = [
        (metrics.MODEL_INFO, (models.champion.artifact.version,
                              models.champion.artifact.feature_service))]
    if models.challenger is not None:
        a = models.challenger.scorer.artifact
        series.append((metrics.CHALLENGER_INFO, (a.version, a.feature_service,
                                                 models.challenger.mode)))
    for gauge, labels in series:
        if present:
            gauge.labels(*labels).set(1)
        else:
            retire(gauge, *labels)
