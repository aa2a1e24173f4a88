"""The swarm as people see it: ``swarm_view`` turns the bootstrap's live view (its STATUS
answer) into workers with their layers, devices, load and links (the round trips each
measured to the other workers and to this head), chains as layer ranges, and the gaps no
worker holds. ``p2pserve status`` prints it, ``/metrics`` reads it, and the
dashboard at ``/`` on the HTTP port draws it.

The dashboard is one server-rendered page (``render_swarm``, plain HTML and inline SVG);
a few lines of JavaScript fetch ``/dashboard.json`` every two seconds (the view, the
last minutes' tokens/s and answers, and the same HTML rendered again) and swap it in.
Nothing is built; the page works without JavaScript, frozen at load time.
"""

from __future__ import annotations

import html
import time

POLL_MS = 2000

def swarm_view(st: dict) -> dict:
    """The bootstrap's STATUS answer as people read it: one entry per worker with its layers,
    devices and load, the chains as layer ranges, and the gaps (layer ranges no worker holds)."""
    plans = st.get("plans") or []
    n_layers = sum(plans[0]["pp_partition"]) if plans else max((w["end"] for w in st.get("workers", [])), default=0)
    in_chains: dict[str, int] = {}
    for chain in st.get("chains", []):
        for p in chain:
            in_chains[p] = in_chains.get(p, 0) + 1
    workers = [_worker_view(w, in_chains.get(w["peer_id"], 0)) for w in st.get("workers", [])]
    by_id = {w["peer_id"]: w for w in workers}
    for view, record in zip(workers, st.get("workers", [])):
        view["links"] = _links(record.get("rtts"), by_id, st.get("head", ""))
    return {
        "head": st.get("head", ""),
        "model": st.get("model", ""),
        "n_layers": n_layers,
        "plans": [_flags(p) for p in plans],
        "workers": workers,
        "chains": [{"peers": chain, "layers": [by_id[p]["layers"] for p in chain if p in by_id]}
                   for chain in st.get("chains", [])],
        "gaps": gaps([tuple(w["layers"]) for w in workers], n_layers),
        "missing": st.get("missing", ""),
        "stats": st.get("stats", {}),
        "spot_checks": st.get("spot_checks"),  # None where the head runs none
        "banned": st.get("banned", {}),
    }


def gaps(ranges, n_layers: int) -> list[list[int]]:
    """The layer ranges [a, b) of 0..n_layers that none of ``ranges`` covers."""
    out, pos = [], 0
    for start, end in sorted(ranges):
        if start > pos:
            out.append([pos, start])
        pos = max(pos, end)
    if pos < n_layers:
        out.append([pos, n_layers])
    return out


def _worker_view(w: dict, chains: int) -> dict:
    devices = [d for d in w.get("devices", []) if isinstance(d, dict)]
    load = w.get("load", {}) if isinstance(w.get("load"), dict) else {}
    layer_times = [d["layer_time"] for d in devices if isinstance(d.get("layer_time"), (int, float))]
    n = w["end"] - w["start"]
    return {
        "peer_id": w["peer_id"],
        "addrs": w.get("addrs", []),
        "stage": w.get("stage", -1),
        "layers": [w["start"], w["end"]],
        "tp": w.get("tp", 1),
        "devices": [str(d.get("name", "?")) for d in devices],
        "dtype": next((str(d["dtype"]) for d in devices if d.get("dtype")), ""),
        "kv_dtype": next((str(d["kv_dtype"]) for d in devices if d.get("kv_dtype")), ""),  # "": an older worker
        "memory_gib": round(sum(d.get("memory", 0) for d in devices) / 2**30, 1),
        "sessions": load.get("sessions", 0),
        "max_sessions": load.get("max_sessions"),
        "queue": load.get("queue", 0),
        # the cost model's figure for this stage's decode step (the slowest rank paces a TP group)
        "step_ms": round(max(layer_times) * n * 1e3, 3) if layer_times else None,
        "group_id": w.get("group_id", ""),
        "version": w.get("version", ""),
        "chains": chains,
    }


def _links(rtts, workers: dict[str, dict], head: str) -> list[dict]:
    """A worker's round trips as its record announces them (``node/pings.py``) to the other
    workers, by layers, then to this head: {"peer", "layers" (None: the head), "rtt_ms"}.
    The other peers it pings (DHT neighbours, other heads) are left out."""
    if not isinstance(rtts, dict):
        return []
    links = [{"peer": p, "layers": workers[p]["layers"] if p in workers else None, "rtt_ms": round(s * 1e3, 3)}
             for p, s in rtts.items() if (p in workers or p == head) and isinstance(s, (int, float))]
    return sorted(links, key=lambda link: (link["layers"] is None, link["layers"] or [], link["peer"]))


def precision_label(worker: dict) -> str:
    """``int4, KV fp16``: a worker's weights' dtype and its KV cache's (the dtype alone for an
    older worker, whose record names no cache dtype)."""
    return f"{worker['dtype']}, KV {worker['kv_dtype']}" if worker["kv_dtype"] else worker["dtype"]


def link_label(link: dict) -> str:
    """``a1b2c3d4 [15-30)`` for a worker (as chains are written), ``head`` for this bootstrap."""
    if link["layers"] is None:
        return "head"
    return f"{link['peer'][-8:]} [{link['layers'][0]}-{link['layers'][1]})"


def _flags(plan: dict) -> str:
    return (f"--hetero-config {' '.join(map(str, plan['hetero_config']))} "
            f"--pp-partition {' '.join(map(str, plan['pp_partition']))}")


# --- the dashboard ------------------------------------------------------------------------------


def dashboard_routes(node) -> list:
    """``GET /`` (the page) and ``GET /dashboard.json`` for the bootstrap's HTTP API."""
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    async def page(request):
        return HTMLResponse(render_page(dashboard_data(node)))

    async def data(request):
        d = dashboard_data(node)
        return JSONResponse({**d, "html": render_swarm(d)}, headers={"Cache-Control": "no-store"})

    return [Route("/", page), Route("/dashboard.json", data)]


def dashboard_data(node) -> dict:
    """The swarm view plus what the metrics saw: tokens/s now and the last minutes' timeline."""
    view = swarm_view(node.status())
    view["tokens_per_s"] = round(node.metrics.tokens_per_second(), 2)
    view["timeline"] = node.metrics.timeline.series(time.monotonic())
    return view


def render_page(data: dict) -> str:
    return PAGE.format(title=html.escape(f"p2pserve: {data['model']}"), body=render_swarm(data), poll=POLL_MS)


def render_swarm(d: dict) -> str:
    """The page's live part, rendered from ``dashboard_data``; every peer-given text escaped."""
    e = html.escape
    n = max(1, d["n_layers"])
    stats = d.get("stats", {})
    out = [f'<header><h1>{e(d["model"])}</h1><dl>'
           f'<dt>layers</dt><dd id="n-layers">{d["n_layers"]}</dd>'
           f'<dt>workers</dt><dd id="n-workers">{len(d["workers"])}</dd>'
           f'<dt>complete chains</dt><dd id="n-chains">{len(d["chains"])}</dd>'
           f'<dt>tokens/s (1 min)</dt><dd id="tokens-per-s">{d.get("tokens_per_s", 0):.1f}</dd>'
           f'<dt>queries</dt><dd>{int(stats.get("queries", 0))}</dd>'
           f'<dt>failovers</dt><dd id="failovers">{int(stats.get("failovers", 0))}</dd></dl></header>']

    def segment(a: int, b: int, cls: str, label: str, peer: str = "") -> str:
        attr = f' data-peer="{e(peer)}"' if peer else ""
        return (f'<div class="seg {cls}"{attr} style="left:{100 * a / n:.3f}%;width:{100 * (b - a) / n:.3f}%"'
                f' title="{e(label)}">{e(label)}</div>')

    out.append(f'<section><h2>Layers 0-{d["n_layers"]}</h2><div class="lanes">')
    for w in sorted(d["workers"], key=lambda w: (w["layers"], w["peer_id"])):
        a, b = w["layers"]
        label = f"{w['peer_id'][-8:]} {a}-{b}"
        out.append(f'<div class="lane">{segment(a, b, "worker", label, w["peer_id"])}</div>')
    if d["gaps"]:
        out.append('<div class="lane">' + "".join(segment(a, b, "gap", f"gap {a}-{b}") for a, b in d["gaps"])
                   + "</div>")
    out.append("</div>")
    if d["gaps"]:
        ranges = ", ".join(f"{a}-{b}" for a, b in d["gaps"])
        out.append(f'<p class="gaps" id="gaps">layers {ranges} have no worker: no query can be answered '
                   f'until a worker serves them</p>')
    elif not d["chains"]:
        out.append(f'<p class="gaps" id="gaps">no complete chain: {e(d.get("missing", ""))}</p>')
    else:
        out.append('<p class="ok" id="gaps">every layer is served</p>')
    out.append("</section>")

    out.append('<section><h2>Workers</h2><table id="workers"><thead><tr><th>worker</th><th>layers</th>'
               '<th>devices</th><th>dtype</th><th>sessions</th><th>queue</th><th>ms/step (predicted)</th>'
               '<th>chains</th><th>links (round trip)</th></tr></thead><tbody>')
    for w in sorted(d["workers"], key=lambda w: (w["layers"], w["peer_id"])):
        step = f'{w["step_ms"]:.2f}' if w["step_ms"] is not None else "?"
        links = "<br>".join(f'<span class="link" data-to="{e(link["peer"])}">{e(link_label(link))}: '
                            f'{link["rtt_ms"]:.2f} ms</span>' for link in w["links"]) or "—"
        out.append(f'<tr class="worker" data-peer="{e(w["peer_id"])}"><td title="{e(w["peer_id"])}">'
                   f'{e(w["peer_id"][-12:])}</td><td>{w["layers"][0]}-{w["layers"][1]}</td>'
                   f'<td>{e(", ".join(w["devices"]))} (TP {w["tp"]})</td><td>{e(precision_label(w))}</td>'
                   f'<td>{w["sessions"]}/{w["max_sessions"] or "?"}</td><td>{w["queue"]}</td><td>{step}</td>'
                   f'<td>{w["chains"]}</td><td>{links}</td></tr>')
    out.append("</tbody></table></section>")

    if d["chains"]:
        out.append("<section><h2>Chains</h2><ol>")
        for c in d["chains"]:
            hops = " → ".join(f"{e(p[-8:])} [{a}-{b})" for p, (a, b) in zip(c["peers"], c["layers"]))
            out.append(f"<li>{hops}</li>")
        out.append("</ol></section>")

    timeline = d.get("timeline", [])
    if timeline:
        out.append('<section><h2>Last minutes</h2><div class="charts">'
                   + _sparkline([p["tokens_per_s"] for p in timeline], "tokens/s")
                   + _sparkline([p["answers"] for p in timeline], "queries per 10 s") + "</div></section>")
    return "".join(out)


def _sparkline(values: list[float], label: str, width: int = 300, height: int = 60) -> str:
    top = max(values) or 1.0
    step = width / max(1, len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 4 - (height - 8) * v / top:.1f}" for i, v in enumerate(values))
    return (f'<figure><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(label)}"><polyline fill="none" stroke="#2563eb" stroke-width="2" '
            f'points="{points}"/></svg><figcaption>{html.escape(label)}: now {values[-1]:.1f}, '
            f'peak {top:.1f}</figcaption></figure>')


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #111; }}
header dl {{ display: flex; flex-wrap: wrap; gap: 0 1.5em; }} dt {{ color: #666; }} dd {{ margin: 0 0 0 .3em; font-weight: 600; }}
header dl > * {{ display: inline; }}
.lanes {{ position: relative; border: 1px solid #ccc; padding: 2px 0; }}
.lane {{ position: relative; height: 1.6em; margin: 2px 0; }}
.seg {{ position: absolute; top: 0; bottom: 0; overflow: hidden; white-space: nowrap; font-size: 12px;
        padding: 0 4px; box-sizing: border-box; border-radius: 3px; }}
.seg.worker {{ background: #bfdbfe; border: 1px solid #2563eb; }}
.seg.gap {{ background: #fecaca; border: 1px solid #dc2626; color: #7f1d1d; font-weight: 600; }}
.gaps {{ color: #b91c1c; font-weight: 600; }} .ok {{ color: #15803d; }}
table {{ border-collapse: collapse; }} th, td {{ border-bottom: 1px solid #e5e7eb; padding: 3px 10px; text-align: left; }}
.charts {{ display: flex; gap: 2em; }} figure {{ margin: 0; }} figcaption {{ color: #555; font-size: 12px; }}
#state {{ color: #888; font-size: 12px; }}
</style></head>
<body><main id="swarm">{body}</main>
<p id="state">live: refreshed every {poll} ms</p>
<script>
async function refresh() {{
  try {{
    const r = await fetch("dashboard.json", {{cache: "no-store"}});
    if (!r.ok) throw new Error("HTTP " + r.status);
    document.getElementById("swarm").innerHTML = (await r.json()).html;
    document.getElementById("state").textContent = "live: updated " + new Date().toLocaleTimeString();
  }} catch (err) {{
    document.getElementById("state").textContent = "the bootstrap does not answer (" + err.message + ")";
  }}
}}
setInterval(refresh, {poll});
</script></body></html>
"""
