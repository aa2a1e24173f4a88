"""Prometheus metrics: the bootstrap's at ``/metrics`` on its ``--http`` port, a worker's on
``worker --metrics HOST:PORT`` (both served by Hypercorn on the peer's trio loop).

The bootstrap observes every answer it generates (libp2p queries and HTTP requests alike,
``Bootstrap.answer``): tokens, time to first token, time per output token, answers in
flight, errors by code. What the swarm looks like (workers, chains, missing layers, each
peer's load and step time, the round trips of its links, failovers) is read from the
bootstrap's live view when scraped, so it is never stale. A worker exposes its own load
from its session server.

Each process keeps its metrics in its own ``CollectorRegistry``, never the global one, so
several peers in one test process do not collide.
"""

from __future__ import annotations

import time
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from p2pserve.errors import P2PServeError

# seconds; a CPU swarm's first token takes ~0.1-2 s, a GPU's ~0.02-0.5 s
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
RATE_WINDOW = 60.0  # seconds over which p2pserve_tokens_per_second is measured
BUCKET = 10.0  # seconds per bucket of the timeline the dashboard draws
HISTORY = 300.0  # seconds of timeline kept


class Timeline:
    """Tokens and answers per BUCKET seconds over the last HISTORY seconds."""

    def __init__(self):
        self.buckets: dict[int, list[int]] = {}  # bucket index -> [tokens, answers]

    def add(self, now: float, tokens: int = 0, answers: int = 0) -> None:
        b = self.buckets.setdefault(int(now // BUCKET), [0, 0])
        b[0] += tokens
        b[1] += answers
        oldest = int((now - HISTORY) // BUCKET)
        for k in [k for k in self.buckets if k < oldest]:
            del self.buckets[k]

    def tokens_per_second(self, now: float, window: float = RATE_WINDOW) -> float:
        """Over the last ``window`` seconds of whole buckets (the current one counts pro rata)."""
        current = int(now // BUCKET)
        n = int(window // BUCKET)
        tokens = sum(self.buckets.get(current - i, [0, 0])[0] for i in range(n + 1))
        return tokens / (n * BUCKET + (now - current * BUCKET))

    def series(self, now: float) -> list[dict]:
        """Oldest first: {"ago": seconds, "tokens_per_s", "answers"} for each bucket of HISTORY."""
        current = int(now // BUCKET)
        n = int(HISTORY // BUCKET)
        return [{"ago": round(now - (current - i) * BUCKET), "tokens_per_s": self.buckets.get(current - i, [0, 0])[0] / BUCKET,
                 "answers": self.buckets.get(current - i, [0, 0])[1]} for i in range(n - 1, -1, -1)]


class BootstrapMetrics:
    def __init__(self, node):
        self.registry = r = CollectorRegistry()
        self.queries = Counter("p2pserve_queries", "Answers started: one per libp2p query, one per choice (n) of an "
                               "HTTP request.", registry=r)
        self.tokens = Counter("p2pserve_generated_tokens", "Tokens generated for clients.", registry=r)
        self.ttft = Histogram("p2pserve_time_to_first_token_seconds",
                              "From the answer's start at the bootstrap to its first token.", buckets=TTFT_BUCKETS,
                              registry=r)
        self.tpot = Histogram("p2pserve_time_per_output_token_seconds",
                              "Mean time per token after the first, one observation per answer.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.sessions = Gauge("p2pserve_sessions", "Answers being generated now.", registry=r)
        self.errors = Counter("p2pserve_errors", "Answers that failed, by error code.", ["code"], registry=r)
        self.timeline = Timeline()
        r.register(_SwarmCollector(node, self))

    async def observe(self, answer, emit, *args, **kwargs) -> None:
        """Run ``answer(emit, …)`` and record what its frames show."""
        t0, first = time.monotonic(), None
        self.queries.inc()
        self.sessions.inc()
        self.timeline.add(t0, answers=1)

        async def watched(frames):
            nonlocal first
            now = time.monotonic()
            n = sum(1 for f in frames if f.get("type") == "token")
            if n:
                if first is None:
                    first = now - t0
                    self.ttft.observe(first)
                self.tokens.inc(n)
                self.timeline.add(now, tokens=n)
            for f in frames:
                if f.get("type") == "done" and first is not None and f.get("n_tokens", 0) > 1:
                    self.tpot.observe((now - t0 - first) / (f["n_tokens"] - 1))
            await emit(frames)

        try:
            await answer(watched, *args, **kwargs)
        except P2PServeError as e:
            self.errors.labels(e.code).inc()
            raise
        except Exception:
            self.errors.labels("internal").inc()
            raise
        finally:
            self.sessions.dec()

    def tokens_per_second(self) -> float:
        return self.timeline.tokens_per_second(time.monotonic())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _SwarmCollector:
    """Read at each scrape from the bootstrap's live view."""

    def __init__(self, node, metrics: BootstrapMetrics):
        self.node, self.metrics = node, metrics

    def collect(self):
        from p2pserve.bootstrap.dashboard import swarm_view

        view = swarm_view(self.node.status())
        yield GaugeMetricFamily("p2pserve_tokens_per_second",
                                f"Tokens generated per second over the last {RATE_WINDOW:g} s.",
                                value=self.metrics.tokens_per_second())
        yield CounterMetricFamily("p2pserve_failovers", "Answers moved to another chain after one failed.",
                                  value=view["stats"].get("failovers", 0))
        yield GaugeMetricFamily("p2pserve_workers", "Live workers.", value=len(view["workers"]))
        yield GaugeMetricFamily("p2pserve_chains", "Complete chains of workers.", value=len(view["chains"]))
        yield GaugeMetricFamily("p2pserve_missing_layers", "Layers no worker holds.",
                                value=sum(b - a for a, b in view["gaps"]))
        yield GaugeMetricFamily("p2pserve_queue", "Sessions waiting for a KV slot, over all workers.",
                                value=sum(w["queue"] for w in view["workers"]))
        labels = ["peer", "layers"]
        families = {
            "sessions": GaugeMetricFamily("p2pserve_peer_sessions", "Sessions a worker holds.", labels=labels),
            "queue": GaugeMetricFamily("p2pserve_peer_queue", "Sessions waiting at a worker.", labels=labels),
            "step": GaugeMetricFamily("p2pserve_peer_step_seconds",
                                      "A worker's decode step over its layers, as the cost model predicts it "
                                      "from the device speed the worker measured.", labels=labels),
        }
        links = GaugeMetricFamily("p2pserve_link_rtt_seconds",
                                  "Round trip from a worker to another worker or to this bootstrap, as the worker "
                                  "measures (libp2p ping) and announces it; routing takes the larger of a pair's "
                                  "two figures.", labels=["from_peer", "to_peer"])
        for w in view["workers"]:
            key = [w["peer_id"], f"{w['layers'][0]}-{w['layers'][1]}"]
            families["sessions"].add_metric(key, w["sessions"])
            families["queue"].add_metric(key, w["queue"])
            if w["step_ms"] is not None:
                families["step"].add_metric(key, w["step_ms"] / 1e3)
            for link in w["links"]:
                links.add_metric([w["peer_id"], link["peer"]], link["rtt_ms"] / 1e3)
        yield from families.values()
        yield links


def metrics_route(node):
    """The Starlette route of ``GET /metrics`` for the bootstrap's HTTP API."""
    from starlette.responses import Response
    from starlette.routing import Route

    async def endpoint(request):
        return Response(node.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", endpoint)


# --- a worker ---------------------------------------------------------------------------------------


class _WorkerCollector:
    def __init__(self, server, layers: str):
        self.server, self.layers = server, layers

    def collect(self):
        load = self.server.load()
        label = ["layers"]
        for name, key, help_ in (("p2pserve_worker_sessions", "sessions", "Sessions held (KV slots in use)."),
                                 ("p2pserve_worker_queue", "queue", "Sessions waiting for a KV slot."),
                                 ("p2pserve_worker_max_sessions", "max_sessions", "KV slots.")):
            g = GaugeMetricFamily(name, help_, labels=label)
            g.add_metric([self.layers], load.get(key, 0))
            yield g
        for name, key, help_ in (("p2pserve_worker_forwards", "forwards", "Forward passes (batched steps)."),
                                 ("p2pserve_worker_forward_steps", "forward_steps", "Session steps computed."),
                                 ("p2pserve_worker_link_frames", "link_frames", "Frames on decode links."),
                                 ("p2pserve_worker_link_steps", "link_steps", "Session steps on decode links.")):
            c = CounterMetricFamily(name, help_, labels=label)
            c.add_metric([self.layers], load.get(key, 0))
            yield c


async def serve_worker_metrics(bind: str, server, start: int, end: int) -> None:
    """Serve a worker's metrics at http://HOST:PORT/metrics on its own trio loop, until cancelled."""
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from prometheus_client import make_asgi_app

    registry = CollectorRegistry()
    registry.register(_WorkerCollector(server, f"{start}-{end}"))
    config = Config()
    config.bind = [bind]
    config.accesslog = config.errorlog = None
    await serve(make_asgi_app(registry), config)
