"""The head peer: registry, router, query protocol and HTTP API. Installs as p2pserve.bootstrap."""

if __name__ != "p2pserve.bootstrap":  # the folder is on sys.path when Python starts in the repository root
    raise ImportError("bootstrap/ is the package p2pserve.bootstrap: install p2pserve (bash scripts/setup.sh) and import p2pserve.bootstrap")
