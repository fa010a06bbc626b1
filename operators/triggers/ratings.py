"""RatingsTrigger: polls the 9B ratings database until a campaign has enough ratings.

Runs in the triggerer, so it must be cheap and never block the event loop: the (synchronous) store call
runs in a thread. A database hiccup over a week-long wait is logged and retried; an unknown campaign or a
bad URL is final (an "error" event, which the sensor turns into a failed task).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from forge.evaluate.human_ratings import RatingError, progress


class RatingsTrigger(BaseTrigger):
    """Fires {"status": "ready", ...progress} once `campaign` has >= `needed` ratings.

    :param db_url: the ratings database as the config names it (env:NAME is resolved in the triggerer, so no
        password travels through Airflow's trigger table).
    :param campaign: the campaign id 9B.prepare published.
    :param needed: ratings needed before the gate can decide.
    :param poke_interval_s: seconds between polls.
    """

    def __init__(self, db_url: str, campaign: str, needed: int, poke_interval_s: float = 300.0) -> None:
        super().__init__()
        self.db_url = db_url
        self.campaign = campaign
        self.needed = int(needed)
        self.poke_interval_s = float(poke_interval_s)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"db_url": self.db_url, "campaign": self.campaign, "needed": self.needed,
                 "poke_interval_s": self.poke_interval_s})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                prog = await asyncio.to_thread(progress, self.db_url, self.campaign)
            except RatingError as exc:  # unknown campaign, unset env var, bad URL: waiting will not fix it
                yield TriggerEvent({"status": "error", "campaign": self.campaign, "message": str(exc)})
                return
            except Exception as exc:  # the database may be restarting; the sensor's timeout bounds this
                self.log.warning("ratings of %s: poll failed (%s: %s); retrying in %.0f s", self.campaign,
                                 type(exc).__name__, exc, self.poke_interval_s)
            else:
                if prog["ratings"] >= self.needed:
                    yield TriggerEvent({**prog, "status": "ready", "needed": self.needed})
                    return
                self.log.info("ratings of %s: %d of %d", self.campaign, prog["ratings"], self.needed)
            await asyncio.sleep(self.poke_interval_s)
