"""A serving process freezes what it allocated at startup, so full collections skip it."""

import gc

from p2pserve.heap import freeze_startup_heap


def test_objects_alive_at_startup_leave_the_collectors_generations():
    startup = [object() for _ in range(1000)]  # noqa: F841  (alive across the freeze)
    tracked = [[i] for i in range(1000)]  # lists are tracked by the collector
    try:
        frozen = freeze_startup_heap()
        assert frozen >= len(tracked)
        assert gc.get_freeze_count() == frozen
        walked = {id(o) for o in gc.get_objects()}  # what a full collection now walks
        assert not any(id(t) in walked for t in tracked)
        later = [[1]]
        assert id(later[0]) in {id(o) for o in gc.get_objects()}  # new objects are still collected
    finally:
        gc.unfreeze()
