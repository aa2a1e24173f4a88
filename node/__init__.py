"""The worker peer: serves one stage of the pipeline to the swarm. Installs as p2pserve.node."""

if __name__ != "p2pserve.node":  # the folder is on sys.path when Python starts in the repository root
    raise ImportError("node/ is the package p2pserve.node: install p2pserve (bash scripts/setup.sh) and import p2pserve.node")
