"""Processes and torch.distributed: one way to start a world of ranks and make its groups;
the local pipeline of `p2pserve run`, a stage's TP group, several stages in one worker."""
