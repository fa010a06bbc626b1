"""`python -m forge ...`: run phases, inspect the ledger, without Airflow.

  python -m forge run 1A --run-id dev1 [--profile demo] [--set train.max_steps=20] [--conf '{...}']
  python -m forge pipeline --run-id dev1 [--profile demo]     # every phase in order
  python -m forge ledger --run-id dev1
  python -m forge phases
  python -m forge serve --run-id dev1 | --release DIR [--host H] [--port P] [--no-ui]   # 8B-8D on one port
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import yaml

from forge.config import ConfigError, load_config
from forge.phases import pipeline_phases


def parse_sets(pairs: list[str]) -> dict:
    """--set a.b=1 --set c=[x,y] -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forge")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "pipeline"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("phase")
        p.add_argument("--run-id", required=True)
        p.add_argument("--profile")
        p.add_argument("--config")
        p.add_argument("--conf", default="{}", help="JSON overrides (like a DAG-run conf)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p = sub.add_parser("ledger")
    p.add_argument("--run-id", required=True)
    p.add_argument("--profile")
    p.add_argument("--config")
    sub.add_parser("phases")
    p = sub.add_parser("serve", help="the inference server over a release (8A's output or a folder)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--release", help="a release folder (release.json inside)")
    src.add_argument("--run-id", help="serve the release 8A assembled in this run")
    p.add_argument("--profile")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--no-ui", action="store_true", help="the API and /metrics only, no Gradio chat")
    p = sub.add_parser("rate", help="9B's blind rating app for the campaign a run's 9B.prepare published")
    p.add_argument("--run-id", required=True)
    p.add_argument("--profile")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)

    if args.cmd == "phases":
        from forge.phases import RETRAINING_PHASES

        for title, phases in (("forge_pipeline", pipeline_phases()), ("forge_router_retraining",
                                                                       RETRAINING_PHASES)):
            print(f"# {title}")
            for ph in phases:
                print(f"{ph.id:12s} {ph.group}.{ph.task_id:24s} {ph.title}  <- {', '.join(ph.inputs) or '-'}")
        return 0
    try:
        from forge.config import deep_merge

        overrides = {}
        if args.cmd in ("run", "pipeline"):
            overrides = deep_merge(json.loads(args.conf), parse_sets(args.set))
        elif args.cmd in ("serve", "rate"):
            overrides = parse_sets(args.set)
        cfg = load_config(args.config, args.profile, overrides)
    except (ConfigError, json.JSONDecodeError) as exc:
        print(exc, file=sys.stderr)
        return 2

    from forge.runner import make_store, run_phase

    if args.cmd == "ledger":
        from forge.ledger import read_rows, render

        print(render(read_rows(make_store(cfg), args.run_id)), end="")
        return 0
    if args.cmd == "serve":
        from forge.serve.server import release_of_run, serve

        release = args.release or release_of_run(make_store(cfg), args.run_id)
        serve(release, cfg, args.host, args.port, with_ui=not args.no_ui)
        return 0
    if args.cmd == "rate":
        from forge.evaluate.rating_app import serve_campaign

        serve_campaign(cfg, make_store(cfg), args.run_id, args.host, args.port)
        return 0
    phases = [args.phase] if args.cmd == "run" else [p.id for p in pipeline_phases(cfg)]
    for phase_id in phases:
        m = run_phase(phase_id, cfg, args.run_id, track=not args.no_track)
        print(json.dumps({"phase": phase_id, "status": m.status, "uri": m.base_uri,
                          "cache_key": m.cache_key[:16], "skip_reason": m.skip_reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
