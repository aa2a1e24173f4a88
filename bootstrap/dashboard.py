"""The swarm as people see it: ``swarm_view`` turns the bootstrap's live view (its STATUS
answer) into workers with their layers, devices and load, chains as layer ranges, and the
gaps no worker holds. ``p2pserve status`` prints it, ``/metrics`` reads it, and the
dashboard at ``/`` on the HTTP port draws it."""

from __future__ import annotations


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
    return {
        "model": st.get("model", ""),
        "n_layers": n_layers,
        "plans": [_flags(p) for p in plans],
        "workers": workers,
        "chains": [{"peers": chain, "layers": [by_id[p]["layers"] for p in chain if p in by_id]}
                   for chain in st.get("chains", [])],
        "gaps": gaps([tuple(w["layers"]) for w in workers], n_layers),
        "missing": st.get("missing", ""),
        "stats": st.get("stats", {}),
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


def _flags(plan: dict) -> str:
    return (f"--hetero-config {' '.join(map(str, plan['hetero_config']))} "
            f"--pp-partition {' '.join(map(str, plan['pp_partition']))}")
