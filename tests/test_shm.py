"""The shared-memory TP all-reduce: the sums gloo gives, on every rank, for every size."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from p2pserve.ranks import shm, world


def _run_ranks(target, size: int, n_results: int, *args) -> list:
    """``target(rank, *args, port, results)`` in ``size`` spawned processes of one world:
    the first ``n_results`` things they put in ``results``; every process is ended."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = world.free_port()
    procs = [ctx.Process(target=target, args=(r, *args, port, results)) for r in range(size)]
    for p in procs:
        p.start()
    try:
        return [results.get(timeout=120) for _ in range(n_results)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _rank(rank: int, size: int, port: int, results) -> None:
    world.join(world.World(("cpu",) * size, f"tcp://127.0.0.1:{port}"), rank, threads=1)
    # a group of ranks 1.. (rank 0 stays out, as another stage's rank would)
    (group,) = world.new_groups([range(1, size)])
    if rank == 0:
        dist.barrier()
        dist.destroy_process_group()
        return
    reduce = shm.ShmAllReduce(group, capacity=1000)
    out = []
    for step, (shape, dtype) in enumerate([((1, 1, 96), torch.float32), ((3, 7, 96), torch.float32),
                                           ((2, 600), torch.float32), ((1, 1, 96), torch.bfloat16),
                                           ((1, 1, 96), torch.float32)] * 3):
        g = torch.Generator().manual_seed(1000 * step + rank)
        h = torch.randn(shape, generator=g).to(dtype)
        mine = h.clone()
        reduce(h)  # 1200 floats: above the capacity, dist.all_reduce takes over
        ref = mine.clone()
        dist.all_reduce(ref, group=group)
        # numpy arrays travel by value: a tensor would be shared through a file descriptor
        # that dies with this process
        out.append((h.float().numpy().copy(), ref.float().numpy().copy(), dtype == torch.float32))
    results.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("tp", [2, 3])
def test_shm_all_reduce_equals_gloo_on_every_rank(tp):
    if os.name != "posix":
        pytest.skip("POSIX shared memory only")
    size = tp + 1
    got = dict(_run_ranks(_rank, size, tp, size))
    assert sorted(got) == list(range(1, size))
    first = got[1]
    for rank, out in got.items():
        for i, (h, ref, fp32) in enumerate(out):
            tol = dict(atol=1e-5, rtol=1e-5) if fp32 else dict(atol=0.1, rtol=0.02)
            np.testing.assert_allclose(h, ref, **tol, err_msg=f"rank {rank} call {i}")
            assert np.array_equal(h, first[i][0]), f"rank {rank} call {i}: ranks must hold identical sums"


def _link_rank(rank: int, port: int, results) -> None:
    world.join(world.World(("cpu",) * 2, f"tcp://127.0.0.1:{port}"), rank, threads=1)
    link = shm.open_link(1 - rank, rank == 0, "cpu")
    # small ones, one past a slot (dist.send takes it), bf16, and more in a row than there
    # are slots, which the sender writes only as the receiver frees them
    shapes = [((1, 600), torch.float32), ((shm.SLOT_BYTES // 4 + 1,), torch.float32),
              ((3, 96), torch.bfloat16)] + [((1, 40 + i), torch.float32) for i in range(3 * shm.SLOTS)]
    out = []
    for i, (shape, dtype) in enumerate(shapes):
        sent = torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(dtype)
        if rank == 0:
            link.send(sent)
        else:
            got = torch.empty(shape, dtype=dtype)
            link.recv(got)
            out.append(torch.equal(got, sent))
    if rank == 0:
        link.close()  # the end of the link, as when a rank exits: the receiver's next read says so
        results.put((0, os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []))
    else:
        try:
            link.recv(torch.empty(4))
            out.append("no error")
        except Exception as e:  # the typed error, not a hang
            out.append(f"{type(e).__name__}: {e}")
        results.put((1, out))
    dist.barrier()
    dist.destroy_process_group()


def test_a_link_hands_over_every_tensor_in_order_and_says_when_its_sender_is_gone():
    if not shm.shared_memory("cpu"):
        pytest.skip("shared-memory links are for x86 CPUs")
    got = dict(_run_ranks(_link_rank, 2, 2))
    *equal, ended = got[1]
    assert equal == [True] * (3 + 3 * shm.SLOTS)
    assert ended.startswith("P2PServeError") and "closed its link" in ended, ended
    assert not [name for name in got[0] if name.startswith("p2pserve-link-")], "the link left files in /dev/shm"


def _stalled_rank(rank: int, port: int, results) -> None:
    world.join(world.World(("cpu",) * 2, f"tcp://127.0.0.1:{port}"), rank, threads=1)
    link = shm.open_link(1 - rank, rank == 0, "cpu")
    if rank == 0:
        shm.WAIT_TIMEOUT = 0.5  # the receiver takes nothing until the barrier below
        try:
            for _ in range(shm.SLOTS + 1):
                link.send(torch.ones(8))
            results.put("no error")
        except Exception as e:
            results.put(f"{type(e).__name__}: {e}")
    dist.barrier()
    dist.destroy_process_group()


def test_a_sender_whose_receiver_takes_nothing_gets_an_error_once_the_slots_are_full():
    if not shm.shared_memory("cpu"):
        pytest.skip("shared-memory links are for x86 CPUs")
    (said,) = _run_ranks(_stalled_rank, 2, 1)
    assert said.startswith("P2PServeError") and "did not take a hand-off" in said, said
