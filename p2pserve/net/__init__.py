"""The network layer: libp2p host, frame format, protocols, signed records, the client."""
