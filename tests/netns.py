"""Emulated machines on one Linux host: network namespaces, a router, slow links, a NAT.

    with Network(rate="100mbit", delay_ms=5) as net:
        head, w1 = net.machine("head"), net.machine("w1")
        hidden = net.machine("w2", nat=True)          # behind a masquerading gateway
        proc = net.spawn(head, ["p2pserve", "bootstrap", ...], log=path)
        net.set_delay(25)                             # takes effect on open connections too

Each machine is a network namespace with one interface, eth0, on its own /24 of
10.77.0.0/16 (machine i is 10.77.i.2), cabled by a veth pair to a router namespace (the
"hub", 10.77.i.1 on its side), which forwards between them: every byte from one machine
to another crosses the hub once. There the link is made slow:

- bandwidth: a `tc tbf` on both ends of each cable (the machine's uplink and downlink);
- latency: `netem delay` on the hub's side of each cable where the kernel has netem;
  where it has not (as here), every TCP connection through the hub is redirected by
  nftables to a delay relay in the hub (`python tests/netns.py relay`), which finds the
  real destination with SO_ORIGINAL_DST, connects to it and holds each chunk of bytes for
  the delay before passing it on, in both directions. Addresses stay the real ones, so
  peers announce and dial each other as across a real network. Unlike netem it does not
  delay the TCP handshake or the endpoints' ACK clock (the relay terminates TCP), so it
  is a little kinder than a real long link to bulk transfers and to connection setup.

A NAT'd machine sits behind a gateway namespace on 192.168.77.0/24; the gateway is a
machine of the hub's network and masquerades (nftables) what leaves it: the machine
can dial out, nobody can dial in. A plain gateway's own TCP stack answers a SYN that no
mapping claims with a reset; one with ``firewall=True`` drops it, as home routers do,
which is what TCP hole punching needs (the first punching SYN to arrive would otherwise
be reset, killing the other side's attempt and its mapping).

Everything is torn down by `close()` (and on interpreter exit): processes started here
are killed by process group, then the namespaces are deleted, which removes their
interfaces, qdiscs and rulesets. Namespaces are named ``p2pn<pid>-…`` so that those of
a run killed before its teardown are recognised and removed by the next one.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "p2pn"
_networks = itertools.count()
RELAY_PORT = 7999
NAT_LAN = "192.168.77"


def why_unavailable() -> str | None:
    """None if this host can build emulated networks, else the reason it cannot."""
    if os.geteuid() != 0:
        return "emulated networks need root (network namespaces, tc, nftables)"
    missing = [tool for tool in ("ip", "tc", "nft") if shutil.which(tool) is None]
    if missing:
        return (f"emulated networks need {', '.join(missing)} (Debian: apt-get install iproute2 nftables; "
                f"scripts/setup.sh does it as root)")
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        tbf = _sh(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit",
                   "burst", "32kb", "latency", "50ms"], check=False)
        if tbf.returncode != 0:
            return f"tc tbf does not work here: {tbf.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def has_netem() -> bool:
    probe = f"{PREFIX}{os.getpid()}-netem"
    subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=True)
    try:
        return _sh(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay",
                    "1ms"], check=False).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


@dataclass
class Machine:
    name: str
    ns: str
    ip: str           # its own address (a private one behind NAT)
    public_ip: str    # where the hub sees it coming from (its gateway's, behind NAT)
    nat: bool = False


class Network:
    def __init__(self, rate: str = "100mbit", delay_ms: float = 0.0, delay_relay: bool = True):
        """``delay_relay=False`` leaves TCP untouched in the hub where netem is missing (no
        added delay then): hole punching needs the peers' own SYNs to meet, which a relay
        terminating every connection in the hub would answer itself."""
        why = why_unavailable()
        if why:
            raise RuntimeError(why)
        remove_stale()
        self.rate, self.delay_ms = rate, delay_ms
        self.tag = f"{PREFIX}{os.getpid()}-{next(_networks)}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.machines: dict[str, Machine] = {}
        self.netem = has_netem()
        self._cables = 0
        self.relay: subprocess.Popen | None = None
        atexit.register(self.close)
        try:
            self.hub = self._namespace("hub")
            self._in(self.hub, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            if not self.netem and delay_relay:
                self._start_relay()
        except BaseException:
            self.close()
            raise

    # --- building ------------------------------------------------------------------------

    def machine(self, name: str, nat: bool = False, firewall: bool = False) -> Machine:
        """A new machine on the hub's network, or behind its own NAT gateway if ``nat``
        (whose ``firewall`` drops unsolicited packets instead of resetting them)."""
        if name in self.machines:
            raise ValueError(f"machine {name!r} exists already")
        if not nat:
            ns = self._namespace(name)
            ip = self._cable(ns, "eth0")
            m = Machine(name, ns, ip, ip)
        else:
            gw = self._namespace(f"{name}-gw")
            public = self._cable(gw, "wan0")
            ns = self._namespace(name)
            self._ip(gw, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip(gw, "addr", "add", f"{NAT_LAN}.1/24", "dev", "lan0")
            self._ip(gw, "link", "set", "lan0", "up")
            self._ip(ns, "addr", "add", f"{NAT_LAN}.2/24", "dev", "eth0")
            self._ip(ns, "link", "set", "eth0", "up")
            self._ip(ns, "route", "add", "default", "via", f"{NAT_LAN}.1")
            self._in(gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self._nft(gw, 'table ip nat {\n'
                          '  chain postrouting { type nat hook postrouting priority srcnat; '
                          'oifname "wan0" masquerade; }\n'
                          '}\n'
                          'table ip filter {\n'
                          '  chain forward { type filter hook forward priority filter; policy drop;\n'
                          '    ct state established,related accept; iifname "lan0" oifname "wan0" accept; }\n'
                          + ('  chain input { type filter hook input priority filter; policy accept;\n'
                             '    iifname "wan0" ct state new drop; }\n' if firewall else '')
                          + '}\n')
            m = Machine(name, ns, f"{NAT_LAN}.2", public, nat=True)
        self.machines[name] = m
        return m

    def _namespace(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _sh(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")
        return ns

    def _cable(self, ns: str, ifname: str) -> str:
        """A veth pair from the hub to ``ns``, addressed, routed and slowed; the far end's IP."""
        self._cables += 1
        i = self._cables
        if i > 250:
            raise RuntimeError("at most 250 machines on one emulated network")
        hub_if, near, far = f"m{i}", f"10.77.{i}.1", f"10.77.{i}.2"
        self._ip(self.hub, "link", "add", hub_if, "type", "veth", "peer", "name", ifname, "netns", ns)
        self._ip(self.hub, "addr", "add", f"{near}/24", "dev", hub_if)
        self._ip(self.hub, "link", "set", hub_if, "up")
        self._ip(ns, "addr", "add", f"{far}/24", "dev", ifname)
        self._ip(ns, "link", "set", ifname, "up")
        self._ip(ns, "route", "add", "default", "via", near)
        self._shape(ns, ifname, delay=False)      # uplink
        self._shape(self.hub, hub_if, delay=True)  # downlink (and, with netem, the delay)
        return far

    def _shape(self, ns: str, dev: str, delay: bool, change: bool = False) -> None:
        verb = "change" if change else "add"
        tbf = ["tbf", "rate", self.rate, "burst", "64kb", "latency", "200ms"]
        if delay and self.netem:
            self._in(ns, "tc", "qdisc", verb, "dev", dev, "root", "handle", "1:", *tbf)
            self._in(ns, "tc", "qdisc", verb, "dev", dev, "parent", "1:1", "handle", "10:", "netem",
                     "delay", f"{self.delay_ms}ms")
        else:
            self._in(ns, "tc", "qdisc", verb, "dev", dev, "root", "handle", "1:", *tbf)

    def _start_relay(self) -> None:
        self._nft(self.hub, 'table ip delay {\n'
                            '  chain prerouting { type nat hook prerouting priority dstnat; '
                            f'meta l4proto tcp redirect to :{RELAY_PORT}; }}\n'
                            '}\n')
        self.relay = subprocess.Popen(
            ["ip", "netns", "exec", self.hub, sys.executable, str(Path(__file__).resolve()), "relay",
             str(RELAY_PORT), str(self.delay_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(self.relay)
        if self.relay.stdout.readline().strip() != "relaying":
            raise RuntimeError("the delay relay did not start")

    # --- using -----------------------------------------------------------------------------

    def set_delay(self, delay_ms: float) -> None:
        """One-way delay between any two machines, from now on (open connections included)."""
        self.delay_ms = delay_ms
        if self.netem:
            for i in range(1, self._cables + 1):
                self._in(self.hub, "tc", "qdisc", "change", "dev", f"m{i}", "parent", "1:1", "handle", "10:",
                         "netem", "delay", f"{delay_ms}ms")
        else:
            self.relay.stdin.write(f"{delay_ms}\n")
            self.relay.stdin.flush()
            if self.relay.stdout.readline().strip() != f"delay {delay_ms}":
                raise RuntimeError("the delay relay did not take the new delay")

    def set_rate(self, rate: str) -> None:
        self.rate = rate
        for i in range(1, self._cables + 1):
            self._in(self.hub, "tc", "qdisc", "change", "dev", f"m{i}", "root", "handle", "1:", "tbf", "rate",
                     rate, "burst", "64kb", "latency", "200ms")
        for m in self.machines.values():
            ns = self._gateway(m) if m.nat else m.ns
            dev = "wan0" if m.nat else "eth0"
            self._in(ns, "tc", "qdisc", "change", "dev", dev, "root", "handle", "1:", "tbf", "rate", rate,
                     "burst", "64kb", "latency", "200ms")

    def _gateway(self, m: Machine) -> str:
        return f"{self.tag}-{m.name}-gw"

    def command(self, machine: Machine, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", machine.ns, *argv]

    def spawn(self, machine: Machine, argv: list[str], log: Path | None = None, **kw) -> subprocess.Popen:
        """Start ``argv`` on ``machine`` in its own process group; killed by ``close()``."""
        if log is not None:
            kw.setdefault("stdout", Path(log).open("w"))
            kw.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(self.command(machine, argv), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def run(self, machine: Machine, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``machine`` to its end (``subprocess.run``'s keywords)."""
        return subprocess.run(self.command(machine, argv), **kw)

    # --- tearing down ---------------------------------------------------------------------

    def close(self) -> None:
        for proc in self.procs:
            _kill_group(proc.pid)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []
        for ns in reversed(self.namespaces):
            _delete_namespace(ns)
        self.namespaces = []
        atexit.unregister(self.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- helpers --------------------------------------------------------------------------

    def _ip(self, ns: str, *args: str) -> None:
        _sh(["ip", "-n", ns, *args])

    def _in(self, ns: str, *argv: str) -> None:
        _sh(["ip", "netns", "exec", ns, *argv])

    def _nft(self, ns: str, ruleset: str) -> None:
        _sh(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset)


def _sh(argv: list[str], check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, input=input)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _delete_namespace(ns: str) -> None:
    """Kill what still runs in ``ns`` (only namespaces this module made), then delete it."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def remove_stale() -> None:
    """Delete the namespaces of runs of this module whose process is gone."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(rf"{PREFIX}(\d+)-", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _delete_namespace(name)


# --- p2pserve peers on emulated machines, started through the CLI as a user does ---------------

STARTUP_TIMEOUT = 120.0


class Peers:
    """A bootstrap and workers, each on its own machine of ``net`` (several may share one),
    each machine with its own state directory under ``root``; killed with the network."""

    def __init__(self, net: Network, root: Path):
        self.net, self.root = net, Path(root)
        self.logs: dict[int, Path] = {}
        self.addr: str | None = None

    def _cli(self, machine: Machine, args: list[str]) -> list[str]:
        home = self.root / machine.name
        home.mkdir(parents=True, exist_ok=True)
        return ["env", f"P2PSERVE_HOME={home}", "PYTHONUNBUFFERED=1", sys.executable, "-m", "p2pserve.cli", *args]

    def spawn(self, machine: Machine, args: list[str], name: str) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        proc = self.net.spawn(machine, self._cli(machine, args), log=log)
        self.logs[proc.pid] = log
        return proc

    def start_bootstrap(self, machine: Machine, *args: str, port: int = 31337) -> str:
        """The bootstrap, listening on ``machine``'s address; its full multiaddr."""
        proc = self.spawn(machine, ["bootstrap", "--listen", f"/ip4/{machine.ip}/tcp/{port}", *args], "bootstrap")
        self.bootstrap = proc
        ip = re.escape(machine.ip)
        self.addr = self.wait_for(proc, rf"(/ip4/{ip}/tcp/{port}/p2p/\w+)").group(1)
        return self.addr

    def start_worker(self, machine: Machine, *args: str, name: str | None = None) -> subprocess.Popen:
        """A worker on ``machine`` joining the bootstrap (not waited for: see ``wait_serving``)."""
        name = name or f"worker-{machine.name}"
        threads = [] if "--threads" in args else ["--threads", "1"]
        return self.spawn(machine, ["worker", "--peer", self.addr, "--group-id", name, *threads, *args], name)

    def wait_serving(self, proc: subprocess.Popen, timeout: float = STARTUP_TIMEOUT) -> str:
        """Wait until a worker serves; its peer id."""
        return self.wait_for(proc, r"worker (\w+) serving layers", timeout).group(1)

    def wait_chains(self, machine: Machine, n: int, timeout: float = STARTUP_TIMEOUT) -> dict:
        """Wait until the bootstrap routes over ``n`` chains, as ``p2pserve status --json`` run
        on ``machine`` shows them; its view. A replica serves before the head has probed it
        (it is on probation until then), so a test that kills the other must wait for this."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.net.run(machine, self._cli(machine, ["status", "--peer", self.addr, "--json"]),
                             capture_output=True, text=True, timeout=60)
            view = json.loads(r.stdout) if r.returncode == 0 else {"chains": [], "error": r.stderr}
            if len(view["chains"]) >= n:
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} chains not routable within {timeout:g} s: {view}")
            time.sleep(1)

    def wait_for(self, proc: subprocess.Popen, pattern: str, timeout: float = STARTUP_TIMEOUT) -> re.Match:
        from p2pserve.testing.swarm import wait_for_log  # here, not at the top: the delay relay runs this file as a script

        return wait_for_log(proc, self.logs[proc.pid], pattern, timeout)

    def log(self, proc: subprocess.Popen) -> str:
        return self.logs[proc.pid].read_text()

    def query(self, machine: Machine, prompt: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``p2pserve query --peer <bootstrap> ... PROMPT`` run on ``machine``."""
        return self.net.run(machine, self._cli(machine, ["query", "--peer", self.addr, *args, prompt]),
                            capture_output=True, text=True, timeout=timeout)


# --- the delay relay (runs in the hub: python tests/netns.py relay PORT DELAY_MS) ------------


def relay_main(port: int, delay_ms: float) -> None:
    """Accept the connections nftables redirects here, connect each to its original
    destination and pass bytes both ways, each chunk held ``delay`` after it arrived.
    A line on stdin sets a new delay in ms (answered "delay D"); EOF on stdin ends it."""
    import asyncio
    import socket
    import struct
    import threading

    delay = [delay_ms / 1000]
    SO_ORIGINAL_DST = 80

    async def pump(reader, writer):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def receive():
            try:
                while data := await reader.read(1 << 16):
                    queue.put_nowait((loop.time() + delay[0], data))
            except OSError:
                pass
            queue.put_nowait((loop.time() + delay[0], b""))

        async def send():
            try:
                while True:
                    due, data = await queue.get()
                    if due > loop.time():
                        await asyncio.sleep(due - loop.time())
                    if not data:
                        if writer.can_write_eof():
                            writer.write_eof()
                        return
                    writer.write(data)
                    await writer.drain()
            except OSError:
                writer.close()

        await asyncio.gather(receive(), send())

    async def handle(reader, writer):
        sock = writer.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            dport, = struct.unpack("!H", raw[2:4])
            dst = socket.inet_ntoa(raw[4:8])
            up_reader, up_writer = await asyncio.open_connection(dst, dport)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()

    def control(loop):
        for line in sys.stdin:
            delay[0] = float(line) / 1000
            print(f"delay {line.strip()}", flush=True)
        loop.call_soon_threadsafe(stop.set)

    async def main():
        nonlocal stop
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        server = await asyncio.start_server(handle, "0.0.0.0", port, reuse_address=True)
        print("relaying", flush=True)
        threading.Thread(target=control, args=(loop,), daemon=True).start()
        async with server:
            await stop.wait()

    stop = None
    asyncio.run(main())


# --- bare libp2p peers for NAT traversal (python tests/netns.py nat-peer ROLE ...) ----------


def nat_peer_main(role: str, args: list[str]) -> None:
    """``head IP``: a host on IP:31337 relaying (net/nat.py: serving_relay); prints its address.
    ``hidden HEAD``: joins HEAD, prints what net/nat.py found ("relayed ADDR" or "direct ADDR").
    ``dial HEAD TARGET [WAIT]``: the same, then dials TARGET (a relayed address) and prints
    "direct" once DCUtR has given it a direct connection to the target, "relayed" if none
    came within WAIT seconds (30); then answers each line "ping" on stdin with "pong" (a
    libp2p ping of the target went through) or "no pong". Each runs until stdin closes."""
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair

    from p2pserve.net.host import connect, dial, host_multiaddrs, quiet_libp2p_logs, running_host
    from p2pserve.net.nat import serving_relay, traversing_nat
    from p2pserve.node.pings import ping

    from multiaddr import Multiaddr as multiaddr_of

    quiet_libp2p_logs()
    if os.environ.get("NAT_PEER_DEBUG"):  # the relay's and DCUtR's own account of each step
        import logging

        dcutr_log = logging.getLogger("libp2p.relay")
        dcutr_log.addHandler(logging.StreamHandler())  # py-libp2p's loggers do not propagate
        dcutr_log.setLevel(logging.DEBUG)

    async def until_stdin_closes():
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)

    async def main():
        if role == "head":
            async with running_host(create_new_key_pair(), [f"/ip4/{args[0]}/tcp/31337"]) as host, \
                    serving_relay(host):
                print(f"head {host_multiaddrs(host)[0]}", flush=True)
                await until_stdin_closes()
            return
        async with running_host(create_new_key_pair(), ["/ip4/0.0.0.0/tcp/0"]) as host:
            head = await connect(host, args[0])
            async with traversing_nat(host, head, args[0], host_multiaddrs(host)) as reach:
                print(f"relayed {reach.relay}" if reach.relay else f"direct {reach.direct}", flush=True)
                if role == "dial":
                    target = args[1].rsplit("/p2p/", 1)[1]
                    peer = await dial(host, target, [args[1]])
                    found = "relayed"
                    if os.environ.get("NAT_PEER_DEBUG"):
                        dcutr = host._dcutr_protocol
                        print("observed", [str(multiaddr_of(a)) for a in await dcutr._get_observed_addrs()], flush=True)
                        print("punch", await dcutr.initiate_hole_punch(peer), flush=True)
                    with trio.move_on_after(float(args[2]) if len(args) > 2 else 30):
                        while True:
                            conns = host.get_network().connections.get(peer) or []
                            if any("/p2p-circuit" not in str(a) for c in conns for a in c.get_transport_addresses()):
                                found = "direct"
                                break
                            await trio.sleep(0.5)
                    print(found, flush=True)
                    while await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True) == "ping\n":
                        try:
                            with trio.fail_after(5):
                                await ping(host, peer, count=1)
                            print("pong", flush=True)
                        except Exception as e:
                            print(f"no pong: {e!r}", flush=True)
                await until_stdin_closes()

    trio.run(main)


if __name__ == "__main__":
    if sys.argv[1:2] == ["relay"]:
        relay_main(int(sys.argv[2]), float(sys.argv[3]))
    elif sys.argv[1:2] == ["nat-peer"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        nat_peer_main(sys.argv[2], sys.argv[3:])
    else:
        sys.exit("usage: python tests/netns.py relay PORT DELAY_MS | nat-peer ROLE ARGS...")
