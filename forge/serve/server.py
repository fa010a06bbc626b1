"""`python -m forge serve --release DIR`: load a release (8A) into the engine, the routing stack, the critic
and the feedback store, and serve the REST API (8B), the Gradio chat (8C) and /metrics (8D) on one port.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.serve.release import Release

if TYPE_CHECKING:
    from forge.config import PipelineConfig
    from forge.serve.service import ChatService

log = logging.getLogger("forge.serve")


def release_resolver(release: Release) -> Any:
    """A base_hidden router references the GGUF it embeds with by content: the release's own GGUF is it."""
    from forge.artifacts import ArtifactError, sha256_file

    def resolve(ref: dict[str, Any]) -> Path:
        if ref.get("sha256") and ref["sha256"] != sha256_file(release.gguf):
            raise ArtifactError(
                f"the router's features come from a GGUF (sha256 {ref['sha256'][:16]}) that is not "
                f"this release's {release.gguf}"
            )
        return release.gguf

    return resolve


def open_routing(release: Release, cfg: PipelineConfig, feedback: Any) -> Any:
    """The release's routing policy (or the registry's champion, serving.router), the detector and the
    configured session store; None without a policy."""
    if cfg.serving.router == "champion":
        from forge.routing.runtime import RoutingRuntime

        return RoutingRuntime.from_registry(cfg, "champion", feedback)
    if release.policy_dir is None:
        return None
    from forge.routing.bundle import RoutingPolicy
    from forge.routing.escalation import EscalationDetector
    from forge.routing.features import open_extractor
    from forge.routing.runtime import RoutingRuntime
    from forge.routing.sessions import open_session_store

    policy = RoutingPolicy.load(release.policy_dir)
    extractor = open_extractor(policy.router.features, release_resolver(release))
    detector = EscalationDetector.load(release.detector_dir) if release.detector_dir else None
    return RoutingRuntime(policy, extractor, open_session_store(cfg.routing.sessions), detector, feedback)


def feedback_writer(cfg: PipelineConfig) -> Any:
    """Where 13A reads feedback: routing.retraining.feedback_root, else <storage.root>/feedback."""
    from forge.artifacts import ArtifactStore
    from forge.routing.feedback import FeedbackWriter
    from forge.runner import make_store

    store = make_store(cfg)
    root = cfg.routing.retraining.feedback_root
    if root is None:
        return FeedbackWriter(store, store.uri("feedback"), flush_every=50)
    return FeedbackWriter(ArtifactStore(root, store.storage_options), root, flush_every=50)


def build_service(release_dir: str | Path, cfg: PipelineConfig, **engine_overrides: Any) -> ChatService:
    from dataclasses import replace

    from forge.serve.engine import Engine, EngineSettings
    from forge.serve.service import ChatService

    release = Release.load(release_dir)
    settings = replace(EngineSettings.from_config(cfg.serving), **engine_overrides)
    feedback = feedback_writer(cfg)
    routing = open_routing(release, cfg, feedback)
    critic = None
    if release.critic_dir is not None:
        from forge.serve.critique import Critic

        critic = Critic.load(release.critic_dir)
    few_shot = None
    if release.few_shot_dir is not None:
        from forge.serve.few_shot import FewShot

        few_shot = FewShot.load(release.few_shot_dir)
    engine = Engine(release, settings)
    suites = {o: cfg.modifiers.suite_of(o) for o in release.options if o in cfg.modifiers.domains}
    return ChatService(engine, cfg.serving, routing, critic, suites=suites, feedback=feedback,
                       few_shot=few_shot, few_shot_default=cfg.meta.few_shot.serving_default)


def release_of_run(store: Any, run_id: str) -> Path:
    """A verified local copy of the release 8A assembled in `run_id`."""
    from forge.artifacts import ArtifactError

    manifest = store.load_manifest(store.run_dir(run_id, "8A"))
    if manifest is None or manifest.status != "complete":
        raise ArtifactError(
            f"run {run_id!r} has no complete 8A output in {store.root}: run forge_pipeline "
            "through 8A first, or pass --release DIR"
        )
    return store.materialize(manifest) / manifest.info.get("release", "release")


def api_keys(cfg: PipelineConfig) -> list[str]:
    raw = os.environ.get(cfg.serving.api_keys_env, "")
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if not keys and not cfg.serving.allow_no_auth:
        raise SystemExit(
            f"forge serve: no API key: set ${cfg.serving.api_keys_env} (comma-separated keys) or "
            "serving.allow_no_auth: true (loopback demos only)"
        )
    return keys


def key_checker(keys: list[str]) -> Any:
    import hmac

    return lambda _user, password: any(hmac.compare_digest(password.encode(), k.encode()) for k in keys)


def serve(
    release_dir: str | Path,
    cfg: PipelineConfig,
    host: str | None = None,
    port: int | None = None,
    with_ui: bool = True,
) -> None:
    import uvicorn

    from forge.serve.api import create_app
    from forge.serve.metrics import json_logging

    json_logging()
    keys = api_keys(cfg)
    service = build_service(release_dir, cfg)
    app = create_app(service, cfg.serving, keys)
    if with_ui:
        from forge.serve.chat_ui import mount_chat

        # with API keys, the chat asks for one too (any user name, the key as password)
        app = mount_chat(app, service, auth=key_checker(keys) if keys else None)
    host, port = host or cfg.serving.host, port or cfg.serving.port
    log.info(
        "serving %s on http://%s:%d (API /v1, chat /chat, metrics /metrics)",
        service.engine.release.name,
        host,
        port,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        service.close()


class BackgroundServer:
    """uvicorn serving `app` on a loopback port in a thread: the phase jobs' (and tests') real HTTP server."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket
        import threading
        import time

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, name="forge-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
