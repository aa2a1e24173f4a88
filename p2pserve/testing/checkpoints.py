"""Random checkpoints, saved as ``save_pretrained`` saves them, for the tests and the GPU check
(no checkpoint can be downloaded where they run)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_random(model_class, config, dirpath, *, seed: int = 0, dtype=torch.float32, shards: int = 1) -> Path:
    """A ``model_class(config)`` with random weights saved in ``dirpath`` (sharded with an
    index when ``shards > 1``)."""
    dirpath = Path(dirpath)
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        # Far from the default init (std 0.02), so logits are spread and greedy decoding varies.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    model = model.to(dtype)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(dirpath, max_shard_size=total // shards + 1 if shards > 1 else "50GB")
    return dirpath
