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
# set wins. It is a count of `pause`s, whose time differs ~20x between CPUs, so the decode
# kernels no longer run on these threads but on their own, which spin for a set time and
# sleep when a step ends (engine/team.cpp); prefill's GEMMs and other torch ops still do.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
