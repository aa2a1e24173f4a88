"""The bootstrap's planner: the plan it publishes, and where a ``--stage auto`` worker goes.

Without ``--hetero-config/--pp-partition`` the published plan is what the planner proposes
for the devices the live workers announce (the even split until one has joined). A worker
that asks with ``--stage auto`` gets the layer range where it adds most to the swarm's
weakest layers, as Petals' servers choose their blocks: missing layers first, then the
slowest ones.

Several workers may ask at once, long before the first of them has loaded its layers and
announced itself. So an assignment counts as served from the moment it is handed out,
until that worker's own record appears or ``PENDING_TTL`` passes (it died while loading).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError
from p2pserve.plan import Plan
from p2pserve.planner.search import ServingStage
from p2pserve.planner.swarm import AutoRequest, assign_stage, plan_for_records, serving_stage
from p2pserve.net.wire import error_frame

from p2pserve.bootstrap.registry import Registry

log = logging.getLogger("p2pserve.bootstrap")

PENDING_TTL = 60.0  # seconds an assignment counts as served before its worker announces


@dataclass
class Pending:
    stage: ServingStage
    until: float  # monotonic


class Planning:
    def __init__(self, config: ModelConfig, registry: Registry, *, explicit: Plan | None, fallback: Plan,
                 dtype: str = "fp32"):
        self.config = config
        self.registry = registry
        self.explicit = explicit
        self.fallback = fallback
        self.dtype = dtype
        self.pending: dict[str, Pending] = {}  # peer id -> what it was told to serve
        self._planned: tuple[tuple, list[Plan]] | None = None

    def plans(self) -> list[Plan]:
        """The published plans: the explicit one, else the planner's for the live workers."""
        if self.explicit is not None:
            return [self.explicit]
        records = self.registry.live()
        if not records:
            return [self.fallback]
        key = tuple(sorted((r.peer_id, r.tp, repr(r.devices)) for r in records))
        if self._planned is None or self._planned[0] != key:
            try:
                plans = plan_for_records(records, self.config, dtype=self.dtype)
            except ConfigError as e:  # the workers so far cannot hold the model on their own
                log.info("no plan for the %d workers yet: %s", len(records), e)
                plans = [self.fallback]
            except Exception:  # a planner bug must not take the PLAN protocol down
                log.exception("planning for %d workers failed", len(records))
                plans = [self.fallback]
            self._planned = (key, plans)
        return self._planned[1]

    def answer(self, plan_info: dict, peer_id: str, request: object) -> dict:
        """The PLAN reply to a ``--stage auto`` worker: the plan info plus its ``assignment``,
        or an error frame naming what was wrong."""
        try:
            return {**plan_info, "assignment": self.assign(peer_id, request)}
        except ConfigError as e:
            return error_frame("bad_request", str(e))
        except Exception as e:  # a planner bug: the worker is told, the bootstrap keeps serving
            log.exception("assigning layers to %s failed", peer_id)
            return error_frame("internal", f"cannot assign layers: {type(e).__name__}: {e}")

    def assign(self, peer_id: str, request: object, now: float | None = None) -> dict:
        """Where the worker ``peer_id`` should serve; ConfigError for a bad request or a device
        too small for any useful range."""
        now = time.monotonic() if now is None else now
        auto = AutoRequest.parse(request)
        serving = [serving_stage(r) for r in self.registry.live() if r.peer_id != peer_id]
        start, end, tp = assign_stage(serving + self._pending(now, exclude=peer_id), auto, self.config,
                                      plan=self.explicit)
        self.pending[peer_id] = Pending(ServingStage(start, end, tp, auto.device), now + PENDING_TTL)
        log.info("worker %s assigned layers %d-%d (TP %d)", peer_id, start, end, tp)
        return {"start": start, "end": end, "tp": tp}

    def _pending(self, now: float, exclude: str) -> list[ServingStage]:
        """Assignments handed out whose workers have not announced yet (nor timed out)."""
        announced = {r.peer_id for r in self.registry.live()}
        self.pending = {p: a for p, a in self.pending.items() if a.until > now and p not in announced}
        return [a.stage for p, a in self.pending.items() if p != exclude]
