"""8A: assemble the release (forge.serve.release's layout: what the inference server loads) from the run's
outputs, write its model card, and upload it to the Hugging Face Hub when a token and a repo are configured.

  model/           2C's GGUF + the HF tokenizer files beside it
  adapters/        base.gguf = 2E's recovery LoRA (absent if 2E skipped), <domain>.gguf = each completed H
  calibration.json 2F (absent if skipped)
  routing/policy   6C (RoutingPolicy.load -> save; absent if skipped: the server serves the base only)
  routing/detector 6B's escalation detector;  critic/ 12A's (opaque folder)
  few_shot/        7B's few-shot template set (absent if 7B skipped)
  README.md        the model card: options, how to serve, the ledger's figures, lineage

Without a token ($<serving.hf_token_env>) or serving.hub_repo it writes upload_plan.json beside the release:
every file that would go up, and why nothing did. The token is read here and handed to huggingface_hub only:
it never reaches a log line, a note, the manifest, MLflow or a file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge.artifacts import ArtifactError, code_version, sha256_file
from forge.serve.release import (
    ADAPTERS_DIR,
    BASE,
    BASE_GGUF,
    CALIBRATION,
    CRITIC_DIR,
    DETECTOR_DIR,
    FEW_SHOT_DIR,
    MODEL_CARD,
    MODEL_DIR,
    POLICY_DIR,
    RELEASE_JSON,
    Release,
    write_release_json,
)

if TYPE_CHECKING:
    from forge.config import PipelineConfig
    from forge.runner import JobContext, JobResult

log = logging.getLogger("forge.serve")

RELEASE = "release"  # the release folder inside 8A's output
UPLOAD_PLAN = "upload_plan.json"
CRITIC_INFO_KEY = "critic_dir"  # 12A may name its folder in its info; default CRITIC_DIR
# the ledger's quality keys the model card shows first (a row can hold a dozen)
HEADLINE = ("acc", "delta_acc", "logprob", "size_mb", "compression_ratio", "bits_per_weight", "ece_after",
            "temperature", "share", "threshold", "objective", "release_mb")
MAX_QUALITY_CELLS = 6


class HubUploadError(RuntimeError):
    """The Hub refused or could not be reached; the message names the repo, never the token."""


# ---- 1. the release folder ------------------------------------------------------------------------------

def place(src: Path, dest: Path) -> None:
    """A hard link where the filesystem allows (a GGUF can be GBs; the runner's commit copies it anyway),
    else a copy. Nothing writes into a placed file, so sharing the inode with the input is safe."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def place_tree(src: Path, dest: Path) -> None:
    for p in sorted(src.rglob("*")):
        if p.is_file():
            place(p, dest / p.relative_to(src))


def add_model(ctx: JobContext, release: Path) -> list[str]:
    """model/base.gguf + whichever tokenizer files 2C shipped beside its GGUF (what it copied from 2A)."""
    from forge.compress.gguf_export import TOKENIZER_FILES
    from forge.runner import input_file

    gguf = input_file(ctx, "2C", "gguf")
    place(gguf.path, release / BASE_GGUF)
    src = ctx.input_dir("2C")
    names = [n for n in TOKENIZER_FILES if n in ctx.inputs["2C"].files]
    if "tokenizer_config.json" not in names:
        raise ArtifactError(f"2C's output ({ctx.inputs['2C'].base_uri}) has no tokenizer_config.json: the "
                            "server needs the HF tokenizer and chat template beside the GGUF")
    for name in names:
        place(src / name, release / MODEL_DIR / name)
    return names


def add_adapters(ctx: JobContext, release: Path) -> dict[str, str | None]:
    """option -> its adapter in the release: the same options 6A routed between (router_data.options_of)."""
    from forge.routing.router_data import options_of

    adapters: dict[str, str | None] = {}
    for option in options_of(ctx):
        if option.lora is None:
            adapters[option.name] = None
            continue
        rel = f"{ADAPTERS_DIR}/{option.name}.gguf"
        place(option.lora.path, release / rel)
        adapters[option.name] = rel
    return adapters


def add_policy(ctx: JobContext, release: Path) -> dict[str, Any] | None:
    """6C's router + thresholds, re-saved through RoutingPolicy (only what the policy is, not 6C's reports).
    A base_hidden router names its GGUF by content: the server resolves that against model/base.gguf by
    sha256, so the bundle is kept as is; checked here so a mismatch fails at release time, not at serve."""
    if ctx.input_skipped("6C"):
        return None
    from forge.routing.bundle import RoutingPolicy

    policy = RoutingPolicy.load(ctx.input_dir("6C"))
    policy.save(release / POLICY_DIR)
    features = policy.router.features
    kind = str(features.get("kind"))
    ref = features.get("gguf") or {}
    if kind == "base_hidden" and ref.get("sha256") and ref["sha256"] != sha256_file(release / BASE_GGUF):
        raise ArtifactError(f"6C's router reads hidden states of a GGUF (sha256 {ref['sha256'][:16]}) that "
                            f"is not this release's {BASE_GGUF} (2C {ctx.inputs['2C'].cache_key[:16]})")
    return {"features": kind, "options": list(policy.router.classes), "threshold": policy.threshold}


def add_detector(ctx: JobContext, release: Path) -> bool:
    if ctx.input_skipped("6B"):
        return False
    from forge.routing.escalation import EscalationDetector

    src = ctx.input_dir("6B") / ctx.input_info("6B").get("detector_dir", "detector")
    place_tree(src, release / DETECTOR_DIR)
    EscalationDetector.load(release / DETECTOR_DIR)  # what the server does: fail here, not at serve time
    return True


def add_critic(ctx: JobContext, release: Path) -> str | None:
    """12A's critic/ copied as is; returns a note when 12A ran but left no such folder."""
    if "12A" not in ctx.inputs or ctx.input_skipped("12A"):
        return None
    name = ctx.input_info("12A").get(CRITIC_INFO_KEY, CRITIC_DIR)
    src = ctx.input_dir("12A") / name
    if not src.is_dir():
        return f"12A's output has no {name}/ folder: the release has no critic"
    place_tree(src, release / CRITIC_DIR)
    return None


def add_few_shot(ctx: JobContext, release: Path) -> bool:
    """7B's template set, loaded once here as the server will (a damaged set fails 8A, not serving)."""
    if "7B" not in ctx.inputs or ctx.input_skipped("7B"):
        return False
    from forge.serve.few_shot import FewShot

    src = ctx.input_dir("7B") / ctx.input_info("7B").get("few_shot", FEW_SHOT_DIR)
    place_tree(src, release / FEW_SHOT_DIR)
    FewShot.load(release / FEW_SHOT_DIR)
    return True


# ---- 2. the model card ----------------------------------------------------------------------------------

def hf_model_id(cfg: PipelineConfig) -> str | None:
    """The config's base model when it is a Hub id (not the demo build, not a local path)."""
    base = cfg.model.base
    if cfg.model.is_demo or base.startswith((".", "/", "~")) or Path(base).exists():
        return None
    return base if re.fullmatch(r"[\w.\-]+/[\w.\-]+", base) else None


def base_model_name(cfg: PipelineConfig) -> str:
    """What the card may say about the base: "demo", a Hub id, or no local path (the card is public)."""
    return "demo" if cfg.model.is_demo else hf_model_id(cfg) or "a local model"


def quality_cell(q: dict[str, Any] | None) -> str:
    if not q:
        return ""
    keys = [k for k in HEADLINE if k in q] or list(q)
    cells = [f"{k}={q[k]:.4g}" if isinstance(q[k], float) else f"{k}={q[k]}"
             for k in keys[:MAX_QUALITY_CELLS]]
    return ", ".join(cells).replace("|", "/")


def ledger_table(rows: list[dict[str, Any]]) -> str:
    """The phases that ran (or were cache hits) as a table; the skipped ones (dozens: disabled modifiers) as
    a list."""
    lines = ["| phase | title | status | output MB | quality |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") == "skipped":
            continue
        status = r.get("status", "")
        lines.append(f"| {r.get('phase', '')} | {str(r.get('title', '')).replace('|', '/')} | {status} | "
                     f"{r.get('output_bytes', 0) / 1e6:.2f} | {quality_cell(r.get('quality'))} |")
    skipped = [str(r.get("phase")) for r in rows if r.get("status") == "skipped"]
    if skipped:
        lines += ["", f"Skipped in this run: {', '.join(skipped)}."]
    return "\n".join(lines)


def lineage_of(ctx: JobContext) -> dict[str, Any]:
    """Every input phase by content (cache key) and tracking (MLflow run); no store paths (the card is
    public)."""
    phases = {}
    for p, m in sorted(ctx.inputs.items()):
        entry: dict[str, Any] = {"status": m.status, "cache_key": m.cache_key}
        if m.status == "skipped":
            entry["skip_reason"] = m.skip_reason
        phases[p] = entry
    # content only: the release's files are the same whichever run (re)computes them (run ids and MLflow runs
    # are in the manifest's info: tracking_of)
    return {"phase": ctx.phase.id, "cache_key": ctx.cache_key, "profile": ctx.config.profile,
            "base_model": base_model_name(ctx.config), "inputs": phases}


def tracking_of(ctx: JobContext) -> dict[str, Any]:
    """Which runs produced the inputs (manifest info and MLflow; not in the release's files)."""
    return {"run_id": ctx.run_id, "mlflow_run_id": ctx.mlflow.id if ctx.mlflow else None,
            "inputs": {p: {"run_id": m.run_id, "mlflow_run_id": m.mlflow_run_id}
                       for p, m in ctx.inputs.items()}}


def option_text(option: str, adapter: str | None) -> str:
    if option != BASE:
        return f"with `{adapter}` (the {option} modifier's LoRA, as its H phase scored it)"
    return f"with `{adapter}` (2E's recovery LoRA)" if adapter else "alone (2E was skipped: no recovery LoRA)"


def model_card(ctx: JobContext, name: str, adapters: dict[str, str | None], routing: dict[str, Any] | None,
               parts: dict[str, bool], rows: list[dict[str, Any]], lineage: dict[str, Any]) -> str:
    import yaml

    cfg = ctx.config
    repo = cfg.serving.hub_repo
    front: dict[str, Any] = {"library_name": "gguf", "pipeline_tag": "text-generation",
                             "tags": ["gguf", "llama.cpp", "lora", "forge",
                                      *[f"modifier-{o}" for o in adapters if o != BASE]]}
    base_model = hf_model_id(cfg)
    if base_model:
        front["base_model"] = base_model
    options = "\n".join(f"- `{o}`: the GGUF {option_text(o, a)}" for o, a in adapters.items())
    if routing:
        route = (f"`{POLICY_DIR}/` routes each request between {', '.join(routing['options'])} "
                 f"(features: {routing['features']}, threshold {routing['threshold']:.2f})"
                 + (f"; `{DETECTOR_DIR}/` detects dissatisfied follow-ups and escalates"
                    if parts["detector"] else "") + ".")
    else:
        route = "No router in this release (6C was skipped): the server answers every request with `base`."
    extras = [f"`{CALIBRATION}` (confidence calibration)" if parts["calibration"] else "",
              f"`{CRITIC_DIR}/` (the self-critique classifier)" if parts["critic"] else "",
              f"`{FEW_SHOT_DIR}/` (few-shot templates: `few_shot: true` in a request)"
              if parts.get("few_shot") else ""]
    extra = ", ".join(e for e in extras if e) or "no calibration or critic"
    download = (f"hf download {repo} --local-dir {name}\n" if repo else "")
    lineage_rows = "\n".join(
        f"| {p} | {e['status']} | `{e['cache_key'][:16]}` |"
        for p, e in lineage["inputs"].items())
    body = f"""# {name}

A Forge release: a base model pruned, quantized to GGUF and recovered, with LoRA modifiers per domain and a
router choosing between them per request. Built by Forge's 8A (cache key `{ctx.cache_key[:16]}`, config
profile `{cfg.profile}`, base model `{lineage['base_model']}`). Every file is listed with its sha256 in
`{RELEASE_JSON}`; the server checks them on load.

## Options

{options}

{route} Also: {extra}.

## Serve

```bash
{download}python -m forge serve --release {name}
```

An OpenAI-compatible API (`/v1/chat/completions`) over llama.cpp; `{BASE_GGUF}` also loads in any llama.cpp
runtime, with an adapter of `{ADAPTERS_DIR}/` as its LoRA.

## Figures of the run

The run's ledger (forge.ledger) for the phases this release is built from: output size and quality.

{ledger_table(rows)}

## Lineage

8A cache key `{ctx.cache_key[:16]}`, forge {_forge_version()} (code {code_version()}), profile
`{cfg.profile}`.
Inputs by content (the store's cache index finds each output by phase and cache key):

| input | status | cache key |
|---|---|---|
{lineage_rows}
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + body


def _forge_version() -> str:
    from forge import __version__

    return __version__


# ---- 3. upload ------------------------------------------------------------------------------------------

def upload_plan(release: Path, repo: str | None, reason: str, private: bool) -> dict[str, Any]:
    files = [{"path": p.relative_to(release).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(release.rglob("*")) if p.is_file()]
    return {"repo": repo, "repo_type": "model", "private": private, "uploaded": False, "reason": reason,
            "files": files, "total_bytes": sum(f["size"] for f in files), "n_files": len(files)}


def upload(release: Path, repo: str, token: str, private: bool, message: str) -> dict[str, Any]:
    """create_repo (exist_ok) + upload_folder. A failure is re-raised naming the repo, with the token scrubbed
    from the message and without the original exception chained (its args could echo the request)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    failure = None
    try:
        repo_url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(release), repo_id=repo, repo_type="model",
                                   commit_message=message)
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}".replace(token, "***")
    if failure is not None:  # raised out here, so the original is not even the implicit __context__
        raise HubUploadError(
            f"8A: uploading the release to the Hub repo {repo!r} failed ({failure}). Check that the network "
            f"reaches the Hub (HF_HUB_OFFLINE unset) and that the token has write access to {repo!r} "
            f"(a 401/403 means it does not)")
    return {"hub_url": str(repo_url), "commit_url": getattr(commit, "commit_url", None) or str(commit)}


# ---- 4. the job -----------------------------------------------------------------------------------------

def run(ctx: JobContext) -> JobResult:
    from forge.ledger import read_rows
    from forge.runner import JobResult

    cfg, sc = ctx.config, ctx.config.serving
    release = ctx.out_dir / RELEASE
    release.mkdir(parents=True)
    notes: list[str] = []

    tokenizer_files = add_model(ctx, release)
    adapters = add_adapters(ctx, release)
    if adapters[BASE] is None:
        notes.append("2E skipped: base option has no recovery adapter")
    calibration = not ctx.input_skipped("2F")
    if calibration:
        from forge.runner import input_file

        place(input_file(ctx, "2F", "calibration").path, release / CALIBRATION)
    routing = add_policy(ctx, release)
    if routing is None:
        notes.append("6C skipped: no router, the server serves the base only")
    elif missing := [o for o in routing["options"] if o not in adapters]:
        notes.append(f"the router also names {missing}, which this release lacks (the server answers those "
                     "with the base)")
    detector = add_detector(ctx, release)
    critic_note = add_critic(ctx, release)
    if critic_note:
        notes.append(critic_note)
    parts = {"calibration": calibration, "detector": detector, "critic": (release / CRITIC_DIR).is_dir(),
             "policy": routing is not None, "few_shot": add_few_shot(ctx, release)}

    name = sc.hub_repo.rsplit("/", 1)[-1] if sc.hub_repo else f"forge-{cfg.profile}"
    # the inputs' rows only: which other phases happen to have finished when 8A runs varies
    rows = [r for r in read_rows(ctx.store, ctx.run_id) if r.get("phase") in ctx.inputs]
    lineage = lineage_of(ctx)
    (release / MODEL_CARD).write_text(model_card(ctx, name, adapters, routing, parts, rows, lineage))
    meta: dict[str, Any] = {
        "name": name, "adapters": adapters, "options": list(adapters), "lineage": lineage,
        "forge_version": _forge_version(), "code_version": code_version(),
        "tokenizer_files": tokenizer_files, "parts": parts,
        "figures": {r["phase"]: {"status": r.get("status"), "output_bytes": r.get("output_bytes"),
                                 "quality": r.get("quality")} for r in rows},
    }
    if routing:
        meta["routing"] = {"features": routing["features"]}
    write_release_json(release, meta)
    loaded = Release.load(release)  # the server's own check, before anything leaves this machine
    files = [p for p in release.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    ctx.log_artifact(release / MODEL_CARD)

    # ---- upload, or the plan of one
    token = (os.environ.get(sc.hf_token_env) or "").strip()
    reasons = [r for r, absent in ((f"no token in ${sc.hf_token_env}", not token),
                                   ("serving.hub_repo is not set", not sc.hub_repo)) if absent]
    info: dict[str, Any] = {"release": RELEASE, "options": loaded.options, "uploaded": False,
                            "hub_repo": sc.hub_repo, "hub_url": None, "parts": parts,
                            "lineage": tracking_of(ctx)}
    if reasons:
        plan = upload_plan(release, sc.hub_repo, "; ".join(reasons), sc.hub_private)
        (ctx.out_dir / UPLOAD_PLAN).write_text(json.dumps(plan, indent=2) + "\n")
        ctx.log_artifact(ctx.out_dir / UPLOAD_PLAN)
        info["upload_plan"] = UPLOAD_PLAN
        notes.append(f"not uploaded ({plan['reason']}): {UPLOAD_PLAN} lists the {len(files)} files "
                     f"({total / 1e6:.1f} MB) that would go to {sc.hub_repo or 'the Hub'}")
    else:
        assert sc.hub_repo is not None
        log.info("8A: uploading %d files (%.1f MB) to the Hub repo %s (private=%s)", len(files), total / 1e6,
                 sc.hub_repo, sc.hub_private)
        done = upload(release, sc.hub_repo, token, sc.hub_private,
                      f"forge release: run {ctx.run_id}, 8A cache key {ctx.cache_key[:16]}")
        info.update(uploaded=True, **done)
        notes.append(f"uploaded {len(files)} files ({total / 1e6:.1f} MB) to {sc.hub_repo}: "
                     f"{done['commit_url']}")

    metrics = {"release_bytes": float(total), "release_files": float(len(files)),
               "options": float(len(loaded.options)), "uploaded": float(info["uploaded"])}
    head = f"release {name}: options {loaded.options}, {len(files)} files, {total / 1e6:.1f} MB"
    quality = {"release_mb": total / 1e6, "options": float(len(loaded.options))}
    return JobResult(metrics=metrics, quality=quality, notes="; ".join([head, *notes]), info=info)
