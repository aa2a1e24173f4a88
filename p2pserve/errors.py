"""User-facing errors. Each names what was wrong and, where it can, what would be right."""


class P2PServeError(Exception):
    """Base class: the CLI prints the message on one line and exits with code 2."""


class ConfigError(P2PServeError):
    """A model, plan, flag or file is not what p2pserve can use."""


class WeightsError(P2PServeError):
    """Weights are missing, of the wrong shape, or of an unsupported architecture."""


class NetworkError(P2PServeError):
    """A peer cannot be reached, or a connection or stream to it failed."""


class Busy(P2PServeError):
    """A peer has no room for another session right now; retrying later may succeed."""
