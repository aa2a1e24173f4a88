"""p2pserve: serve Llama-family models from a peer-to-peer swarm of unequal machines."""

import os as _os

# Pipeline stages on one machine take turns: while one computes, the others wait for its
# activations. libgomp's default makes an idle process's OpenMP threads spin ~300k rounds
# (milliseconds) after each parallel region, stealing the core the working stage needs:
# [1 1]/[15 15] on 2 cores ran 40 ms/token against 19 for one stage. A short spin keeps
# back-to-back ops inside a step fast and lets a waiting stage yield: 23 ms/token
# (OMP_WAIT_POLICY=PASSIVE, no spin at all, costs a wake-up per op: 29-35 ms).
# libgomp reads this when torch loads it, so it applies to processes that import
# p2pserve before torch, and to every rank and worker p2pserve starts. A value the user
# set wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# Weights in 2 MiB pages. A decode step streams every weight once, and in 4 KiB pages that
# is a TLB miss every 4 KiB: SmolLM2's layers ran 0.51 ms each in one process and 0.58 ms
# in the second stage of [1 1]/[15 15] (whose page-table walks start cold after the other
# stage's pass); with huge pages both run 0.44 ms, and the one-stage plan decodes ~15%
# faster. PyTorch's CPU allocator aligns allocations of 2 MiB and more to 2 MiB and
# madvises them huge when this is set (read once, at its first allocation; the kernel
# must allow THP: "madvise" or "always" in /sys/kernel/mm/transparent_hugepage/enabled).
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
