"""Command-line options shared by `run`, `query` and `bootstrap`: one definition, one check."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from p2pserve.errors import ConfigError
from p2pserve.engine.generate import SamplingParams


def plan_options(f):
    @click.option("--hetero-config", type=int, multiple=True, metavar="TP",
                  help="TP degree of each stage, e.g. --hetero-config 2 1 (space-separated).")
    @click.option("--pp-partition", type=int, multiple=True, metavar="N",
                  help="Layers of each stage, e.g. --pp-partition 20 10.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def plan_from_options(hetero_config: tuple[int, ...], pp_partition: tuple[int, ...]):
    """The Plan the flags describe, or None when neither was given. ``--pp-partition``
    alone means TP 1 for every stage."""
    from p2pserve.plan import Plan

    if not hetero_config and not pp_partition:
        return None
    if not pp_partition:
        raise ConfigError("--hetero-config needs --pp-partition too (the layers of each stage)")
    return Plan(hetero_config or (1,) * len(pp_partition), pp_partition)


def generation_options(f):
    @click.option("--max-new-tokens", type=int, default=128, show_default=True)
    @click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
    @click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
    @click.option("--top-p", type=float, default=1.0, show_default=True)
    @click.option("--seed", type=int, default=None, help="Makes a sampled answer reproducible.")
    @click.option("--chat/--no-chat", default=True, show_default=True,
                  help="Wrap the prompt in the model's chat template.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def sampling_from_options(opts: dict) -> tuple[SamplingParams, bool]:
    """Pop the generation options out of ``opts``; validate them once."""
    params = SamplingParams(
        temperature=opts.pop("temperature"), top_k=opts.pop("top_k"), top_p=opts.pop("top_p"),
        seed=opts.pop("seed"), max_new_tokens=opts.pop("max_new_tokens"),
    )
    return params, opts.pop("chat")


LIST_FLAGS = ("--hetero-config", "--pp-partition", "--global-batch-sizes", "--global_bsz_size", "--chunks")


def expand_list_flags(argv: list[str]) -> list[str]:
    """Let users type HexGen's lists as they do there: ``--pp-partition 20 10``.

    click options take one value each, so ``--pp-partition 20 10`` becomes
    ``--pp-partition 20 --pp-partition 10`` (commas work too: ``--pp-partition 20,10``).
    """
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, inline = arg.partition("=")
        if flag in LIST_FLAGS:
            values = inline.split(",") if eq else []
            i += 1
            while not eq and i < len(argv) and all(v.strip().isdigit() or v.strip().lstrip("-").isdigit()
                                                   for v in argv[i].split(",") if v.strip()) and argv[i].strip():
                values += argv[i].split(",")
                i += 1
            if not values:
                raise ConfigError(f"{flag} needs at least one integer, e.g. {flag} 20 10")
            for v in values:
                if v.strip():
                    out += [flag, v.strip()]
            continue
        out.append(arg)
        i += 1
    return out


def check_devices(devices: str, flag: str = "--devices") -> list[str]:
    """The device names of ``devices`` ("cpu" or "cuda:0,cuda:1"), checked against this
    machine before anything loads: ConfigError naming the flag otherwise."""
    names = [d.strip() for d in devices.split(",") if d.strip()]
    if not names:
        raise ConfigError(f"{flag} is empty: give cpu or cuda:N, one per TP rank")
    for name in names:
        if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
            raise ConfigError(f"{flag} {devices}: unknown device {name!r}; use cpu or cuda:N")
    cuda = [n for n in names if n.startswith("cuda")]
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {devices}: CUDA is not available on this machine "
                              f"(torch {torch.__version__}); use {flag} cpu")
        count = torch.cuda.device_count()
        for n in cuda:
            if n != "cuda" and int(n[5:]) >= count:
                raise ConfigError(f"{flag} {devices}: {n} does not exist; this machine has cuda:0..cuda:{count - 1}")
    return names


def parse_bind(text: str, flag: str) -> tuple[str, int]:
    """HOST:PORT of an HTTP listener, HOST 127.0.0.1 if only PORT is given (every interface
    only when asked for); ConfigError naming ``flag`` if malformed."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536 or (":" in text and not host):
        raise ConfigError(f"{flag} {text!r}: expected [HOST:]PORT, e.g. {flag} 8000 or {flag} 0.0.0.0:8000")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind_text(host: str, port: int) -> str:
    """HOST:PORT as a listener takes it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_bindable(text: str, flag: str) -> tuple[str, int]:
    """Fail now, before any banner, if HOST:PORT cannot be listened on (in use, no such address)."""
    import socket

    host, port = parse_bind(text, flag)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"{flag} {text}: cannot resolve {host!r} ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself will
        try:
            s.bind(addr)
        except OSError as e:
            raise ConfigError(f"cannot listen on {flag} {text}: {(e.strerror or str(e)).lower()}; "
                              f"another process holds the port, pick another one") from None
    return host, port


# --- --config FILE: a TOML file of a command's options ---------------------------------------------

PATH_KEYS = ("model", "home", "swarm_key", "allow_peers", "identity")  # relative to the config file


def config_option(settings=None):
    """``--config FILE``: every option the command's flags can set, read from a TOML file
    (``listen = "/ip4/0.0.0.0/tcp/31337"``, ``kv_memory = "2GB"``; dashes or underscores);
    a flag given on the command line overrides the file. ``settings(data, path)`` turns
    keys of the command's own (the plan file's ``[[pipeline]]`` for the bootstrap) into
    option keys first, and returns notes for the operator beside them."""

    def callback(ctx, param, path):
        if path is None:
            return
        data = read_toml(path, "--config")
        if settings is not None:
            data, notes = settings(data, path)
            for note in notes:
                click.echo(f"note: {note}", err=True)
        ctx.default_map = {**(ctx.default_map or {}), **config_defaults(ctx.command, data, path)}

    return click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        is_eager=True, expose_value=False, callback=callback, metavar="FILE.toml",
                        help="Read options from this TOML file (keys as the flags' names); flags override it.")


def read_toml(path: Path, what: str) -> dict:
    import tomllib

    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid TOML: {e}") from None


def config_defaults(command: click.Command, data: dict, path: Path) -> dict:
    """``data``'s keys as click's default_map of ``command``: each key names a flag of it."""
    by_flag, names = {}, []
    for p in command.params:
        if isinstance(p, click.Option) and p.expose_value:
            names.append(_key(p.opts[0]))
            for opt in p.opts + p.secondary_opts:
                by_flag[_key(opt)] = p
    unknown = [k for k in data if _key(k) not in by_flag]
    if unknown:
        raise ConfigError(f"--config {path}: unknown option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; {command.name} reads {', '.join(sorted(names))}")
    out = {}
    for key, value in data.items():
        key = _key(key)
        param = by_flag[key]
        if isinstance(value, dict):
            raise ConfigError(f"--config {path}: {key} must be a value, not a table")
        if isinstance(value, list) and not param.multiple:
            value = ",".join(map(str, value))  # devices = ["cuda:0", "cuda:1"], stage = [1, 2]
        if param.multiple and not isinstance(value, list):
            value = [value]
        if key in PATH_KEYS and isinstance(value, str) and not Path(value).expanduser().is_absolute() \
                and (Path(path).parent / value).exists():
            value = str((Path(path).parent / value).resolve())
        if key in map(_key, param.secondary_opts):
            value = not value  # no_chat = true
        out[param.name] = value
    return out


def _key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
