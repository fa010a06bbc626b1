"""8C: the Gradio chat, mounted on the API server at /chat.

A streaming chatbot over the same ChatService the REST API uses, with a mode selector (10A), optional
self-consistency (11A) and self-critique (12B), a routing panel saying how the last answer was routed and
served, and thumbs up / down with a comment on the last answer, written to the feedback store 13A reads.
One routing session per conversation in a browser tab (a uuid made at page load, a new one when the chat is
cleared), so the escalation detector sees the conversation and the A/B arm stays fixed through it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from forge.serve.engine import EngineBusy, PromptTooLong
from forge.serve.serve_config import MODES
from forge.serve.service import ChatRequest

if TYPE_CHECKING:
    import gradio as gr
    from fastapi import FastAPI

    from forge.serve.service import ChatResult, ChatService, RouteInfo

log = logging.getLogger("forge.serve.chat")

MAX_COMMENT = 4000  # as the API's /v1/feedback
MODE_HELP = ("fast: the base alone · accurate: the router's best modifier · auto: a modifier only when the "
             "router is confident enough")


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def routing_markdown(route: RouteInfo, result: ChatResult | None = None) -> str:
    """The routing panel: how the request was routed (known before the first token) and served (after)."""
    rows = [("mode", route.mode),
            ("confidence", f"{_fmt(route.confidence)} (threshold {_fmt(route.threshold)}"
                           + (f", arm {route.arm})" if route.arm else ")")),
            ("escalated", ("**yes**" if route.escalated else "no")
             + (f" (score {_fmt(route.escalation_score)})" if route.escalation_score is not None else "")),
            ("reason", route.reason.replace("|", "\\|")),
            ("router", f"{route.router_ms:.1f} ms, turn {route.turn}")]
    if route.probs:
        rows.append(("probabilities", ", ".join(f"{o} {p:.2f}" for o, p in
                                                sorted(route.probs.items(), key=lambda kv: -kv[1]))))
    if result is None:
        rows.append(("latency", "…"))
    else:
        u = result.usage
        rows += [("latency", f"{result.latency_ms:.0f} ms"),
                 ("time to first token", f"{u.first_token_ms:.0f} ms"),
                 ("tokens", f"{u.prompt_tokens} prompt + {u.completion_tokens} completion, "
                            f"finish: {u.finish_reason}")]
        if u.tokens_per_s:
            rows.append(("speed", f"{u.tokens_per_s:.1f} tokens/s"))
        if u.switch_ms:
            rows.append(("adapter switch", f"{u.switch_ms:.2f} ms"))
        sc = result.extras.get("self_consistency")
        if sc:
            rows.append(("self-consistency", f"{sc['samples']} paths, agreement {sc['agreement']:.2f}"))
        cr = result.extras.get("critique")
        if cr:
            rows.append(("critique", cr["skipped"] if "skipped" in cr else
                         f"score {cr['first_score']} → {cr['final_score']} (threshold {cr['threshold']}), "
                         f"{len(cr['regenerations'])} regeneration(s)"))
        rows.append(("request", f"`{result.request_id}`"))
    # the option is the table's header row: the first thing to read
    return f"| option | **{route.option}** |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def new_session() -> str:
    return f"ui-{uuid.uuid4().hex}"


def _window(conversation: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """The last `limit` messages, starting at a user turn (the API refuses longer conversations; the UI
    slides instead)."""
    tail = conversation[-limit:]
    while tail and tail[0]["role"] != "user":
        tail = tail[1:]
    return tail


def build_chat(service: ChatService) -> gr.Blocks:
    import gradio as gr

    cfg = service.cfg
    name = service.engine.release.name
    has_critic = service.critic is not None

    def respond(message: str, conversation: list[dict[str, str]], mode: str, self_consistency: bool,
                critique: bool, session_id: str, last: dict[str, str] | None) -> Iterator[tuple[Any, ...]]:
        """Streams one answer. Outputs: textbox, chatbot, conversation, routing panel, last answer, status."""
        message = (message or "").strip()
        if not message:
            gr.Warning("Type a message first.")
            yield (gr.skip(),) * 6
            return
        turns = [*conversation, {"role": "user", "content": message}]
        shown = [*turns, {"role": "assistant", "content": ""}]
        # the thumbs rate what is on screen: nothing while a new answer is being written
        yield "", shown, gr.skip(), "_routing…_", None, ""
        req = ChatRequest(_window(turns, cfg.max_messages), mode=mode, session_id=session_id,
                          max_tokens=cfg.default_max_tokens,
                          self_consistency=cfg.self_consistency.samples if self_consistency else 1,
                          critique=critique)
        text, route = "", None
        try:
            for event in service.stream(req):
                if event["type"] == "route":
                    route = event["route"]
                    yield gr.skip(), gr.skip(), gr.skip(), routing_markdown(route), gr.skip(), gr.skip()
                elif event["type"] == "delta":
                    text += event["text"]
                    shown[-1] = {"role": "assistant", "content": text}
                    yield gr.skip(), shown, gr.skip(), gr.skip(), gr.skip(), gr.skip()
                else:
                    result = event["result"]
                    shown[-1] = {"role": "assistant", "content": result.text}
                    last = {"session_id": result.session_id, "request_id": result.request_id}
                    yield gr.skip(), shown, shown, routing_markdown(result.route, result), last, gr.skip()
        except (PromptTooLong, EngineBusy, ValueError) as e:  # the request's fault or a full queue: say so
            gr.Warning(str(e))
            yield message, conversation, gr.skip(), failed(route, f"not answered: {e}"), last, gr.skip()
        except Exception as e:  # a failed generation must not kill the page: keep the question for a retry
            log.exception("chat: generation failed (session %s, request %s)", session_id, req.request_id)
            gr.Warning(f"generation failed: {e}")
            yield message, conversation, gr.skip(), failed(route, f"generation failed: {e}"), last, gr.skip()

    def failed(route: RouteInfo | None, why: str) -> str:
        return (routing_markdown(route) + "\n\n" if route is not None else "") + f"**{why}**"

    def rate(rating: int, comment: str, last: dict[str, str] | None) -> tuple[Any, Any]:
        if not last:
            gr.Warning("There is no answer to rate yet.")
            return gr.skip(), "_Nothing to rate yet._"
        comment = (comment or "").strip()[:MAX_COMMENT] or None
        try:
            service.rate(last["session_id"], last["request_id"], rating, comment)
        except Exception as e:  # no store, or it failed to write: the comment stays in the box for a retry
            log.exception("chat: feedback on request %s not recorded", last["request_id"])
            gr.Warning(f"feedback not recorded: {e}")
            return gr.skip(), f"_Feedback not recorded: {e}_"
        thumb = "Thumbs up" if rating > 0 else "Thumbs down"
        said = " with your comment" if comment else ""
        return "", f"{thumb} recorded for answer `{last['request_id'][:12]}`{said}. Thank you!"

    def clear() -> tuple[Any, ...]:
        return new_session(), [], "_Ask something to see how it is routed._", None, "", ""

    with gr.Blocks(title=f"Forge chat · {name}", analytics_enabled=False) as demo:
        # per browser tab: a callable State value is evaluated at page load
        session = gr.State(new_session)
        conversation = gr.State([])  # finished turns only: what the next request sends
        last = gr.State(None)  # {session_id, request_id} of the last answer: what the thumbs rate
        options = ", ".join(f"`{o}`" for o in service.options)
        gr.Markdown(f"## Forge chat · `{name}`\nOptions served: {options}")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", height=440, feedback_options=None,
                                     buttons=["copy"], placeholder="Ask a question to start.")
                with gr.Row():
                    box = gr.Textbox(elem_id="chat-input", show_label=False, placeholder="Your message…",
                                     lines=1, max_lines=8, scale=5, autofocus=True)
                    send = gr.Button("Send", elem_id="send", variant="primary", scale=1, min_width=80)
                with gr.Row():
                    mode = gr.Radio(list(MODES), value=cfg.default_mode, label="Mode", info=MODE_HELP,
                                    elem_id="mode", scale=3)
                    with gr.Column(scale=2, min_width=160):
                        sc = gr.Checkbox(label=f"Self-consistency ({cfg.self_consistency.samples} paths)",
                                         elem_id="self-consistency")
                        crit_label = "Self-critique" + ("" if has_critic else " (this release has no critic)")
                        crit = gr.Checkbox(label=crit_label, elem_id="critique", interactive=has_critic)
            with gr.Column(scale=2, min_width=280):
                gr.Markdown("### Routing")
                routing = gr.Markdown("_Ask something to see how it is routed._", elem_id="routing-panel")
                gr.Markdown("### Feedback on the last answer")
                comment = gr.Textbox(label="Comment (optional)", elem_id="feedback-comment", lines=2,
                                     max_length=MAX_COMMENT)
                with gr.Row():
                    # words, not emoji: headless and minimal desktops often lack an emoji font
                    up = gr.Button("Thumbs up", elem_id="thumbs-up", size="sm")
                    down = gr.Button("Thumbs down", elem_id="thumbs-down", size="sm")
                status = gr.Markdown(elem_id="feedback-status")

        chat_io = dict(fn=respond, inputs=[box, conversation, mode, sc, crit, session, last],
                       outputs=[box, chatbot, conversation, routing, last, status],
                       concurrency_limit=cfg.workers, concurrency_id="chat", api_visibility="private")
        send.click(**chat_io)
        box.submit(**chat_io)
        up.click(lambda c, lst: rate(1, c, lst), [comment, last], [comment, status], api_visibility="private")
        down.click(lambda c, lst: rate(-1, c, lst), [comment, last], [comment, status],
                   api_visibility="private")
        # the chatbot's own trash button starts a new conversation, and a new routing session: the escalation
        # detector must not read the first question of the new one as a rephrasing of the old one
        chatbot.clear(clear, None, [session, conversation, routing, last, status, comment],
                      api_visibility="private")
    # beyond the engine's own queue, Gradio's waits (and shows the position) instead of failing
    demo.queue(max_size=cfg.queue_size)
    return demo


def mount_chat(app: FastAPI, service: ChatService, path: str = "/chat", auth: Any = None) -> FastAPI:
    """The chat UI at `path` of the API's app (one port). `auth`: Gradio's (user, password) pairs or
    checker; None = open, as the loopback demo."""
    import gradio as gr

    # gradio 6: theme/css/footer are mount-time settings; no SSR (it needs a node server beside uvicorn)
    return gr.mount_gradio_app(app, build_chat(service), path=path, auth=auth, ssr_mode=False,
                               footer_links=["api", "settings"], run_history=False, mcp_server=False)
