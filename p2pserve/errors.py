"""p2pserve's one error type. Each names what was wrong and, where it can, what would be right."""


class P2PServeError(Exception):
    """A message for people and a code for programs. Frames carry it as 'error' {code,
    message} (``p2pserve.net.wire.error_frame``; ``RemoteError`` on the receiving side),
    the HTTP API maps the code to a status, and the CLI prints the message on one line
    and exits with code 2."""

    code = "internal"

    def __init__(self, message: str = "", code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


# Codes that blame the request, not the peers that served it: retrying elsewhere cannot help.
REQUEST_CODES = frozenset({"bad_request", "shape", "unknown_model"})


class ConfigError(P2PServeError):
    """A model, plan, flag or file is not what p2pserve can use."""

    code = "bad_request"


class WeightsError(P2PServeError):
    """Weights are missing, of the wrong shape, or of an unsupported architecture."""


class NetworkError(P2PServeError):
    """A peer cannot be reached, or a connection or stream to it failed."""

    code = "stage_failed"


class Busy(P2PServeError):
    """A peer has no room for another session right now; retrying later may succeed."""

    code = "busy"
