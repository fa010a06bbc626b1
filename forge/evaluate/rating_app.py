"""9B: the rating app. Raters open the link they were sent (/rate/<id>?key=<key>), see one blind answer at a
time and score it 1-10.

  GET  /                     what the study is, and how far it is
  GET  /rate/{rater}?key=K   the rater's next unrated item (prompt + answer; no model, mode or option names),
                             or a thank-you page when they are done
  POST /rate/{rater}?key=K   form fields item_id, score (1-10), comment (optional): stored, 303 to the next
  GET  /api/progress         the campaign's progress as JSON (what the Airflow sensor polls, for humans)

A rater's key is an HMAC of campaign and rater id under the app's secret (human_ratings.rater_key): the ids
are guessable, the keys are not; a missing or wrong key is a 403 and stores nothing. Every text on a page
is HTML-escaped (the answers are model text), and the pages forbid scripts by CSP.
"""

from __future__ import annotations

import hmac
import html
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from forge.evaluate.human_ratings import (
    MAX_COMMENT_CHARS,
    MAX_SCORE,
    MIN_SCORE,
    RatingError,
    campaign_info,
    progress,
    rater_id,
    rater_key,
    rater_view,
    record,
)
from forge.evaluate.validation_config import HumanEvalStudyConfig

# no script runs on these pages, whatever a model wrote; forms post back to this app only
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the page's URL holds the rater's key
}
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem;
  color: #222; }
pre { white-space: pre-wrap; word-wrap: break-word; background: #f5f5f5; padding: .8rem; border-radius: 4px; }
.scores label { display: inline-block; margin: 0 .4rem .4rem 0; padding: .3rem .6rem; border: 1px solid #bbb;
  border-radius: 4px; }
textarea { width: 100%; } .error { color: #a00; } .muted { color: #666; }
"""
_INT = re.compile(r"\s*([+-]?\d+)\s*")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    doc = (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
           f"content='width=device-width, initial-scale=1'><title>{_e(title)}</title><style>{STYLE}</style>"
           f"</head><body>{body}</body></html>")
    return HTMLResponse(doc, status_code=status, headers=HEADERS)


def error_page(exc: RatingError, back: str | None = None) -> HTMLResponse:
    link = f"<p><a href='{_e(back)}'>Back</a></p>" if back else ""
    return page("Error", f"<h1>Sorry</h1><p class=error>{_e(exc)}</p>{link}", exc.status)


def parse_score(raw: Any) -> int:
    """The form's score as an int; anything else (missing, 7.5, 'ten') is a clear 422."""
    m = _INT.fullmatch(raw) if isinstance(raw, str) else None
    if not m:
        raise RatingError(f"score must be a whole number from {MIN_SCORE} to {MAX_SCORE} "
                          f"(got {'nothing' if raw in (None, '') else repr(raw)})", status=422)
    return int(m.group(1))


def create_rating_app(db_url: str | None, campaign: str, cfg: HumanEvalStudyConfig, secret: bytes) -> FastAPI:
    """The app over one published campaign (fails now, not at the first rater, if it is not published).
    The campaign's stored shape (raters, tasks_per_rater, needed) rules; cfg gives the pass mark; `secret`
    signs the raters' links."""
    if len(secret) < 16:
        raise ValueError("the rating app's link secret must be at least 16 bytes")
    shape = campaign_info(db_url, campaign)
    raters = shape["raters"]
    app = FastAPI(title="Forge human evaluation", docs_url=None, redoc_url=None, openapi_url=None)

    def signed(rater: str, key: str | None) -> None:
        # bytes: compare_digest refuses non-ASCII str, and a key is whatever the URL held
        if not key or not hmac.compare_digest(key.encode(), rater_key(secret, campaign, rater).encode()):
            raise RatingError("this link is not valid: open the link you were sent, with its key", status=403)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> Response:
        p = await run_in_threadpool(progress, db_url, campaign)
        return page("Forge human evaluation", f"""
<h1>Rate some answers</h1>
<p>An AI assistant answered a set of questions. Each rater scores {p['tasks_per_rater']} of its answers,
one at a time, from {MIN_SCORE} (useless or wrong) to {MAX_SCORE} (excellent): correct, helpful and clear.
You are not told which system or setting produced an answer; judge the answer alone.</p>
<p>Open the link you were sent (<code>/rate/&lt;your rater id&gt;?key=...</code>): it is yours alone.</p>
<h2>Progress</h2>
<p>{p['ratings']} of {p['needed']} ratings needed; {p['raters_finished']} of {raters} raters finished,
{p['raters_started']} started. The study passes if the mean score is at least {cfg.min_mean:g}.</p>
<p class=muted>campaign {_e(campaign)} &middot; {p['items']} answers</p>""")

    @app.get("/api/progress")
    async def api_progress() -> Response:
        return JSONResponse(await run_in_threadpool(progress, db_url, campaign), headers=HEADERS)

    @app.get("/rate/{rater}", response_class=HTMLResponse)
    async def rate_page(rater: str, key: str | None = None) -> Response:
        try:
            signed(rater, key)
            view = await run_in_threadpool(rater_view, db_url, campaign, rater)
        except RatingError as exc:
            return error_page(exc)
        item = view["next"]
        if item is None:
            return page("Thank you", f"<h1>Thank you, you are done</h1><p>You rated all {view['assigned']} "
                                     "answers assigned to you. You can close this page.</p>")
        radios = "".join(
            f"<label><input type=radio name=score value={s} required> {s}</label>"
            for s in range(MIN_SCORE, MAX_SCORE + 1)
        )
        return page(f"Rate answer {view['rated'] + 1} of {view['assigned']}", f"""
<p class=muted>{_e(rater)}: answer {view['rated'] + 1} of {view['assigned']}</p>
<h2>Question</h2><pre>{_e(item['prompt'])}</pre>
<h2>Answer</h2><pre>{_e(item['output'])}</pre>
<form method=post>
<input type=hidden name=item_id value="{_e(item['item_id'])}">
<p>How good is this answer? {MIN_SCORE} = useless or wrong, {MAX_SCORE} = excellent.</p>
<p class=scores>{radios}</p>
<p><label>Comment (optional)<br><textarea name=comment rows=3 maxlength={MAX_COMMENT_CHARS}></textarea>
</label></p>
<p><button type=submit>Submit and continue</button></p>
</form>""")

    @app.post("/rate/{rater}")
    async def rate(rater: str, request: Request, key: str | None = None) -> Response:
        # relative, key kept: works wherever the app is mounted
        back = f"{quote(rater, safe='')}?key={quote(key or '', safe='')}"
        try:
            signed(rater, key)
            form = await request.form()
            item_id = form.get("item_id")
            if not isinstance(item_id, str) or not item_id:
                raise RatingError("the form has no item_id", status=422)
            comment = form.get("comment")
            await run_in_threadpool(record, db_url, campaign, rater, item_id, parse_score(form.get("score")),
                                    comment if isinstance(comment, str) else "")
        except RatingError as exc:
            return error_page(exc, back if exc.status not in (403, 404) else None)
        return RedirectResponse(back, status_code=303, headers=HEADERS)

    return app


def serve_campaign(cfg: Any, store: Any, run_id: str, host: str, port: int) -> None:
    """`python -m forge rate --run-id RUN`: the campaign 9B.prepare published in that run, (re)published and
    served to the raters."""
    import uvicorn

    from forge.artifacts import ArtifactError
    from forge.evaluate.human_study import republish

    manifest = store.load_manifest(store.run_dir(run_id, "9B.prepare"))
    if manifest is None or manifest.status != "complete":
        raise ArtifactError(f"run {run_id!r} has no complete 9B.prepare output in {store.root}: enable "
                            "validation.human and run forge_pipeline through 9B.prepare first")
    h = cfg.validation.human
    info = republish(h, store.materialize(manifest))
    campaign = info["campaign"]
    secret = os.environ.get(h.link_secret_env, "").encode()
    if not secret:
        secret = secrets.token_bytes(32)
        print(f"${h.link_secret_env} is not set: the raters' links hold until this app stops (set it to keep "
              "them across restarts)", flush=True)
    app = create_rating_app(h.db_url, campaign, h, secret)
    from forge.config import forge_home

    public = socket.getfqdn() if host in ("0.0.0.0", "::") else host  # a link must name a reachable host
    links = write_links(forge_home() / "ratings" / f"{campaign}-links.tsv", campaign, secret,
                        f"http://{public}:{port}", h.raters)
    # the links are the raters' credentials: into a file only this user reads, not the log
    print(f"rating app for campaign {campaign}: http://{host}:{port}/; the {h.raters} raters' links are in "
          f"{links} (send each rater theirs)", flush=True)
    # no access log: a request line carries the rater's key
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)


def write_links(path: Path, campaign: str, secret: bytes, base_url: str, raters: int) -> Path:
    """rater id <TAB> link, one line per rater, written whole (temp file + rename) and readable only by
    this user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{rater_id(i)}\t{base_url}/rate/{rater_id(i)}?key={rater_key(secret, campaign, rater_id(i))}"
            for i in range(1, raters + 1)]
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover temp file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(rows) + "\n")
    os.replace(tmp, path)
    return path
