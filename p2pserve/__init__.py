"""p2pserve: serve Llama-family models from a peer-to-peer swarm of unequal machines."""

__version__ = "0.1.0"
