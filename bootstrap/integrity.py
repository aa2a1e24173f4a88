"""Result integrity: a worker carries user traffic only once it has answered as the swarm
does, and while it serves, a sample of its answers is checked against other workers.

Nothing a worker says about itself proves that it computes its layers honestly: a peer
can announce every layer and a tiny step time, then answer with fixed tokens. So a new
worker is on probation (``Registry.admission``) until it passes an *admission probe*: the
head opens a session through a chain that contains it, exactly as it opens a user's
(same protocol, a ticket, a chat prompt, greedy sampling), and compares the tokens with
what admitted workers answer to the same prompt. Equal: admitted. Different twice (two
prompts, so a near-tie in the logits cannot ban an honest worker): every worker of that
chain still on probation is banned, and comes back on probation after the ban.

The swarm's first complete chain is admitted on trust: there is nothing yet to compare
it with. Only chains that compute every layer in the same precision (``alike``: the
weights' dtype and the KV cache's, as the records say) give the same greedy tokens: across
precisions a near tie goes either way (SmolLM2 int4 against fp32: one token in about 25,
bench/quality.py), which no check may take for a lie. So the probe's reference chain and
a spot check's witness and judge are chains alike the checked one; a worker no admitted
chain is alike is admitted unchecked, with a log line saying so, and its answers go
unchecked until one is.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from contextlib import aclosing

import trio

from p2pserve.bootstrap.server import _ChainFailed, hops
from p2pserve.engine.generate import Sampled, SamplingParams
from p2pserve.net.records import WorkerRecord

log = logging.getLogger("p2pserve.bootstrap")

PROBE_TOKENS = 8  # greedy tokens compared per probe
MISMATCHES_TO_BAN = 2
CHECK_INTERVAL = 0.2  # seconds between looks for workers on probation
PROBE_PROMPTS = (
    "What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
    "What is 12 times 12?", "Who wrote Hamlet?", "Give me a synonym for happy.",
    "How many legs does a spider have?", "What language is spoken in Brazil?",
)


def alike(records: list[WorkerRecord], chain: list[WorkerRecord]) -> list[WorkerRecord]:
    """The workers of ``records`` that compute each of their layers in the precision
    ``chain`` computes it in: any chain of them answers greedily as ``chain`` does."""
    per_layer = {layer: r.precision for r in chain for layer in range(r.start, r.end)}

    def computes_as_chain(r: WorkerRecord) -> bool:
        # a record's range is not bounded by the model where it arrives: one wider than the
        # chain cannot match, and is not walked layer by layer
        if r.end - r.start > len(per_layer):
            return False
        mine = r.precision
        return all(per_layer.get(layer) == mine for layer in range(r.start, r.end))

    return [r for r in records if computes_as_chain(r)]


class Admission:
    def __init__(self, node):
        self.node = node  # the Bootstrap: its registry, tokenizer and way of running a chain
        self.registry = node.registry
        self.mismatches: dict[str, int] = {}
        self.references: dict[str, list[int]] = {}  # prompt -> the admitted chains' greedy tokens
        self._probing: set[str] = set()

    async def run(self) -> None:
        self.registry.admission = True
        async with trio.open_nursery() as nursery:
            while True:
                self._admit_or_probe(nursery)
                await trio.sleep(CHECK_INTERVAL)

    def _admit(self, record: WorkerRecord, why: str) -> None:
        self.registry.admitted.add(record.peer_id)
        self.mismatches.pop(record.peer_id, None)
        log.info("worker %s admitted (layers %d-%d): %s", record.peer_id, record.start, record.end, why)

    def _admit_or_probe(self, nursery) -> None:
        waiting = [r for r in self.registry.on_probation() if r.peer_id not in self._probing]
        if not waiting:
            return
        if self.registry.best_chain() is None:
            founding = self.registry.best_chain(records=self.registry.live())
            for r in founding or []:
                if r.peer_id not in self.registry.admitted:
                    self._admit(r, "the swarm's first complete chain, admitted on trust")
            return
        for r in waiting:
            chain = self._chain_through(r)
            if chain is not None:
                self._probing.update(x.peer_id for x in chain)
                nursery.start_soon(self._probe, r, chain)

    def _chain_through(self, record: WorkerRecord) -> list[WorkerRecord] | None:
        """A complete chain with ``record`` in it, through admitted workers where there are."""
        others = [r for r in self.registry.live() if r.peer_id != record.peer_id]
        probation = frozenset(r.peer_id for r in self.registry.on_probation())
        n = self.registry.n_layers
        before = self.registry.best_chain(records=others, avoid=probation, end=record.start) \
            if record.start > 0 else []
        after = self.registry.best_chain(records=others, avoid=probation, start=record.end) \
            if record.end < n else []
        if before is None or after is None:
            return None
        return before + [record] + after

    async def _probe(self, record: WorkerRecord, chain: list[WorkerRecord]) -> None:
        newcomers = [r for r in chain if r.peer_id not in self.registry.admitted]
        try:
            new = frozenset(r.peer_id for r in newcomers)
            if self.registry.best_chain(exclude=new) is None:
                return
            reference = self.registry.best_chain(exclude=new, records=alike(self.registry.routable(), chain))
            if reference is None:
                runs = sorted({"/".join(r.precision) for r in newcomers})
                for r in newcomers:
                    self._admit(r, f"not checked: it runs {', '.join(runs)} (dtype/KV cache), and no admitted "
                                   f"chain computes its layers in the same precision to compare with")
                return
            prompt = random.choice(PROBE_PROMPTS)
            try:
                if prompt not in self.references:
                    self.references[prompt] = await self._answer(reference, prompt)
                got = await self._answer(chain, prompt)
            except Exception as e:  # a chain that fails the probe is a failed chain like any other
                self.registry.failed([r.peer_id for r in newcomers], f"admission probe: {e}")
                return
            if got == self.references[prompt]:
                for r in newcomers:
                    self._admit(r, f"its chain answered the admission probe as the swarm does ({len(got)} tokens)")
                return
            for r in newcomers:
                self.mismatches[r.peer_id] = self.mismatches.get(r.peer_id, 0) + 1
                if self.mismatches[r.peer_id] >= MISMATCHES_TO_BAN:
                    self.mismatches.pop(r.peer_id)
                    self.registry.ban(r.peer_id, f"answered the admission probe unlike the swarm "
                                                 f"({MISMATCHES_TO_BAN} prompts)")
        finally:
            self._probing.difference_update(r.peer_id for r in chain)

    async def _answer(self, chain: list[WorkerRecord], prompt: str) -> list[int]:
        ids = self.node.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return await replay(self.node, chain, ids, SamplingParams(temperature=0.0, max_new_tokens=PROBE_TOKENS))


SPOT_TOKENS = 16  # tokens of an answer a spot check compares
SPOT_AT_ONCE = 8  # witnesses running together; answers beyond that go unchecked rather than wait
WITNESS_WAIT = 30.0  # seconds a checked answer waits for its witness before going on unchecked


@dataclasses.dataclass
class _Witness:
    """A second chain computing the first tokens of a checked answer, beside the user's."""
    peers: frozenset[str]
    checked: list[WorkerRecord]  # the records of the checked chain, whose precision a judge's must have
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    tokens: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    failed: bool = False
    changed: trio.Event = dataclasses.field(default_factory=trio.Event)

    async def until(self, n: int) -> bool:
        """Wait until the witness has ``n`` tokens or ended; False if it failed or is too slow."""
        with trio.move_on_after(WITNESS_WAIT):
            while len(self.tokens) < n and not self.done:
                await self.changed.wait()
            return not self.failed
        return False


class SpotChecks:
    """While serving, a sample of answers (``rate``) is checked *as it streams*: a second
    chain without the answer's workers (the witness) computes its first ``SPOT_TOKENS``
    tokens beside the user's chain, and the user receives each of those tokens only once
    both chains gave it. Token for token is exact for greedy and seeded sampling (unseeded
    answers are not reproducible and are never sampled). Where the two chains disagree, a
    third chain without the workers of one side decides; the workers only the losing chain
    holds are banned, and when the user's chain lost, the answer goes on from the agreed
    tokens on another chain (the head's failover), so the user never sees the wrong text.
    A checked answer streams its first tokens at the slower chain's pace; the swarm pays a
    replay of ``SPOT_TOKENS`` tokens per check."""

    def __init__(self, node, rate: float):
        self.node, self.rate = node, rate
        self.registry = node.registry
        self._nursery = None
        self._running = 0
        self.stats = {"checked": 0, "agreed": 0, "caught": 0, "corrected": 0, "unresolved": 0,
                      "no_other_chain": 0, "no_alike_chain": 0, "witness_failed": 0}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await trio.sleep_forever()

    def witness(self, served: frozenset[str], prompt: list[int], params: SamplingParams) -> _Witness | None:
        """Maybe check the answer about to be served by ``served``: start its witness."""
        reproducible = params.temperature == 0 or params.seed is not None
        if (self._nursery is None or not reproducible or self._running >= SPOT_AT_ONCE
                or random.random() >= self.rate):
            return None
        routable = self.registry.routable()
        checked = [r for r in routable if r.peer_id in served]
        other = self.registry.best_chain(avoid=served, records=alike(routable, checked))
        if other is None or {r.peer_id for r in other} == served:
            # none at all, or only chains of another precision, which cannot check this one
            unlike = self.registry.best_chain(avoid=served, records=routable)
            alone = unlike is None or {r.peer_id for r in unlike} == served
            self.stats["no_other_chain" if alone else "no_alike_chain"] += 1
            return None
        witness = _Witness(frozenset(r.peer_id for r in other), checked)
        sub = dataclasses.replace(params, max_new_tokens=min(SPOT_TOKENS, params.max_new_tokens), logprobs=None)
        self._nursery.start_soon(self._run_witness, witness, other, prompt, sub)
        self.stats["checked"] += 1
        return witness

    async def _run_witness(self, witness: _Witness, chain: list[WorkerRecord], prompt, params) -> None:
        self._running += 1
        try:
            with witness.scope:
                async for chunk in self.node._run_chain(hops(chain), prompt, params, False):
                    witness.tokens += [t.token if isinstance(t, Sampled) else t for t in chunk]
                    witness.changed.set()
                    witness.changed = trio.Event()
        except Exception as e:  # a witness failing is not the answer's failure: it goes on unchecked
            log.info("spot check dropped: its witness chain failed (%s)", e)
            witness.failed = True
        finally:
            self._running -= 1
            witness.done = True
            witness.changed.set()

    async def checked(self, served: frozenset[str], source, witness: _Witness, prompt: list[int],
                      params: SamplingParams):
        """``source``'s token lists (the user's chain), each passed on once the witness agrees.
        Raises the head's chain failure, naming the liars, when a third chain sides with the
        witness."""
        seen: list[int] = []  # the user's chain's token ids so far
        agreed = 0
        try:
            async with aclosing(source):
                async for chunk in source:
                    seen += [t.token if isinstance(t, Sampled) else t for t in chunk]
                    need = min(len(seen), SPOT_TOKENS)
                    if witness is not None and need > agreed:
                        if not await witness.until(need):
                            self.stats["witness_failed"] += 1
                            witness.scope.cancel()
                            witness = None
                        elif seen[agreed:need] == witness.tokens[agreed:need]:
                            agreed = need
                        else:
                            await self._settle(served, witness, prompt, params, seen[:need])
                            witness = None  # the witness lost (banned), or no third chain could tell
                    yield chunk
        finally:
            if witness is not None:  # every token the user's chain gave within the window agreed
                witness.scope.cancel()
                if agreed:
                    self.stats["agreed"] += 1

    async def _settle(self, served: frozenset[str], witness: _Witness, prompt, params, tokens: list[int]) -> None:
        """The user's chain and its witness disagree on ``tokens``: a third chain decides."""
        got = witness.tokens[:len(tokens)]
        judge = self._judge(served, witness.peers, witness.checked)
        sub = dataclasses.replace(params, max_new_tokens=len(tokens), logprobs=None)
        verdict = None if judge is None else await replay(self.node, judge, prompt, sub)
        judged = frozenset(r.peer_id for r in judge or [])
        # the losing chain's workers that neither agreeing chain holds gave the wrong answer
        if verdict == tokens:
            liars, user_lost = witness.peers - served - judged, False
        elif verdict == got:
            liars, user_lost = served - witness.peers - judged, True
        else:
            liars, user_lost = frozenset(), False
        if not liars:
            self.stats["unresolved"] += 1
            log.warning("spot check: chains %s and %s disagree and no third chain settles it",
                        sorted(served), sorted(witness.peers))
            return
        self.stats["caught"] += 1
        for peer in liars:
            self.registry.ban(peer, "a spot check caught it answering unlike two other chains")
        if user_lost:
            self.stats["corrected"] += 1
            raise _ChainFailed(liars, "a spot check caught this chain answering unlike two others; "
                                      "the answer goes on from the agreed tokens on another chain")

    def _judge(self, a: frozenset[str], b: frozenset[str], checked: list[WorkerRecord]) -> list[WorkerRecord] | None:
        """A third chain for two that disagree, alike them (as ``checked``): without the workers
        only one of them holds (tried for each side), and not the other chain itself."""
        candidates = alike(self.registry.routable(), checked)
        for accused, other in ((a, b), (b, a)):
            judge = self.registry.best_chain(exclude=accused - other, avoid=other, records=candidates)
            if judge is not None and {r.peer_id for r in judge} != other:
                return judge
        return None


async def replay(node, chain: list[WorkerRecord], prompt: list[int], params: SamplingParams) -> list[int]:
    """The tokens ``chain`` answers to ``prompt``, through a session the head opens as for a user."""
    tokens: list[int] = []
    async for chunk in node._run_chain(hops(chain), prompt, params, False):
        tokens += chunk
    return tokens
