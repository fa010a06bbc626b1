"""Automation domain: pick the right tool and fill its arguments, answered as one JSON object.

The prompt lists three tools (the right one and two distractors, in random order) as
`name(arg, ...)` and states a request; the reference is {"name": ..., "arguments": {...}}.
The check spec carries the call's JSON schema (tool name as a const, typed/enum'd arguments).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forge.data.suites.base import Task, pick

DOMAIN = "automation"

CITIES = ("Paris", "London", "Tokyo", "Berlin", "Rome", "Madrid", "Oslo", "Cairo", "Lima", "Delhi")
PEOPLE = ("ann", "bob", "carl", "dana", "eve", "fred", "gina", "hugo")
SUBJECTS = ("lunch", "report", "meeting", "invoice", "party", "trip")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
EVENTS = ("dentist", "gym", "team call", "dinner", "haircut", "yoga")
CURRENCIES = ("USD", "EUR", "GBP", "JPY")
TODOS = ("buy milk", "call mom", "pay rent", "wash car", "book flight", "water plants")
PRIORITIES = ("low", "medium", "high")
ROOMS = ("kitchen", "bedroom", "office", "garage", "hall")
TOPICS = ("python lists", "cheap flights", "pasta recipes", "solar power", "chess openings", "rain boots")


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, dict[str, Any]]  # argument name -> JSON schema
    request: Callable[[random.Random], tuple[str, dict[str, Any]]]  # -> (request text, arguments)

    def signature(self) -> str:
        return f"{self.name}({', '.join(self.parameters)})"

    def call_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "name": {"const": self.name},
                "arguments": {"type": "object", "properties": self.parameters,
                              "required": list(self.parameters), "additionalProperties": False},
            },
            "required": ["name", "arguments"],
        }


def _weather(rng: random.Random) -> tuple[str, dict[str, Any]]:
    city, unit = pick(rng, CITIES), pick(rng, ("celsius", "fahrenheit"))
    return f"What is the weather in {city} in {unit}?", {"city": city, "unit": unit}


def _timer(rng: random.Random) -> tuple[str, dict[str, Any]]:
    minutes = rng.randint(1, 60)
    return f"Set a timer for {minutes} minutes.", {"minutes": minutes}


def _email(rng: random.Random) -> tuple[str, dict[str, Any]]:
    to, subject = f"{pick(rng, PEOPLE)}@example.com", pick(rng, SUBJECTS)
    return f"Email {to} with the subject {subject}.", {"to": to, "subject": subject}


def _event(rng: random.Random) -> tuple[str, dict[str, Any]]:
    title, day = pick(rng, EVENTS), pick(rng, DAYS)
    return f"Put {title} in my calendar on {day}.", {"title": title, "day": day}


def _convert(rng: random.Random) -> tuple[str, dict[str, Any]]:
    amount = rng.randint(1, 500)
    source, target = rng.sample(CURRENCIES, 2)
    return f"Convert {amount} {source} to {target}.", {"amount": amount, "source": source, "target": target}


def _todo(rng: random.Random) -> tuple[str, dict[str, Any]]:
    task, priority = pick(rng, TODOS), pick(rng, PRIORITIES)
    return f"Add {task} to my todo list with {priority} priority.", {"task": task, "priority": priority}


def _lights(rng: random.Random) -> tuple[str, dict[str, Any]]:
    room, on = pick(rng, ROOMS), rng.random() < 0.5
    return f"Turn {'on' if on else 'off'} the lights in the {room}.", {"room": room, "on": on}


def _search(rng: random.Random) -> tuple[str, dict[str, Any]]:
    query = pick(rng, TOPICS)
    return f"Search the web for {query}.", {"query": query}


TOOLS: tuple[Tool, ...] = (
    Tool("get_weather", {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, _weather),
    Tool("set_timer", {"minutes": {"type": "integer", "minimum": 1}}, _timer),
    Tool("send_email", {"to": {"type": "string"}, "subject": {"type": "string"}}, _email),
    Tool("create_event", {"title": {"type": "string"}, "day": {"enum": list(DAYS)}}, _event),
    Tool("convert_currency", {"amount": {"type": "number"}, "source": {"enum": list(CURRENCIES)},
                              "target": {"enum": list(CURRENCIES)}}, _convert),
    Tool("add_todo", {"task": {"type": "string"}, "priority": {"enum": list(PRIORITIES)}}, _todo),
    Tool("set_lights", {"room": {"type": "string"}, "on": {"type": "boolean"}}, _lights),
    Tool("search_web", {"query": {"type": "string"}}, _search),
)


def make_task(rng: random.Random) -> Task:
    tool = pick(rng, TOOLS)
    distractors = rng.sample([t for t in TOOLS if t is not tool], 2)
    listed = [tool, *distractors]
    rng.shuffle(listed)
    request, arguments = tool.request(rng)
    prompt = f"Tools: {'; '.join(t.signature() for t in listed)}. Request: {request}"
    answer = json.dumps({"name": tool.name, "arguments": arguments})
    check = {"kind": "tool_call", "name": tool.name, "arguments": arguments, "schema": tool.call_schema()}
    return Task(prompt, answer, check, tool.name)
