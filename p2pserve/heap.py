"""Keep Python's cyclic garbage collector off what a serving process allocated at startup.

A worker holds a million or so long-lived Python objects once torch, libp2p, the model and
the DHT are up. CPython's full (generation 2) collection walks all of them: traced in a
worker, 190-470 ms each (five of them during startup alone), and one that comes due while
serving stalls every session on that worker for as long. ``gc.freeze()`` moves every
object alive at that moment into a permanent generation that collections skip, so a
full collection then costs what serving itself allocated (as Instagram's and gunicorn's
servers do). Objects frozen here are never collected if they later become cyclic
garbage: call it once, when startup is over.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze everything still alive; the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
