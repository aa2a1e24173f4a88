"""Sharded training checkpoints, readable by any layout.

Each rank writes ``rank-NNNNN.pt``: its pieces (which rows or columns of which Hugging
Face tensor) with their values and optimizer state. Rank 0 writes ``train.json``: the
step, the layout, the optimizer and the model's fingerprint. Because every piece says
which part of which tensor it is, a job resumes under a different layout (other TP
degrees, other pipelines): each rank cuts its new pieces out of the saved ones.
``export_hf`` joins the pieces into a Hugging Face directory the serving side loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError
from p2pserve.train.model import Piece
from p2pserve.train.trainer import RankTrainer

META = "train.json"


def records(trainer: RankTrainer) -> list[dict]:
    """This rank's pieces: which part of which tensor, its values and its optimizer state."""
    out = []
    for piece, param in trainer.stage.named_pieces():
        state = trainer.optimizer.state.get(param, {})
        out.append({
            "piece": piece.__dict__,
            "value": param.detach().clone(),
            "state": {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()},
        })
    return out


def save(directory: Path, trainer: RankTrainer, layout_dict: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"step": trainer.step_index, "pieces": records(trainer)}, directory / _rank_file(trainer.comm.rank))
    if trainer.comm.rank == 0:
        (directory / META).write_text(json.dumps({
            "step": trainer.step_index,
            "world_size": trainer.comm.world_size,
            "layout": layout_dict,
            "optimizer": trainer.optim_config.kind,
            "fingerprint": trainer.stage.config.fingerprint(),
        }, indent=1))


def read_meta(directory: Path, config: ModelConfig) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise ConfigError(f"--resume {directory} has no {META}: give a directory written by --save")
    meta = json.loads(path.read_text())
    if meta.get("fingerprint") != config.fingerprint():
        raise ConfigError(f"--resume {directory} was saved from another model than {config.name}")
    return meta


def load(directory: Path, trainer: RankTrainer) -> None:
    """Set this rank's pieces and optimizer state from a checkpoint of any layout."""
    directory = Path(directory)
    meta = read_meta(directory, trainer.stage.config)
    if meta["optimizer"] != trainer.optim_config.kind:
        raise ConfigError(f"--resume {directory} was trained with {meta['optimizer']}, "
                          f"not {trainer.optim_config.kind}: use --optimizer {meta['optimizer']}")
    restore(trainer, saved_pieces(directory, meta["world_size"]), meta["step"])


def restore(trainer: RankTrainer, saved: dict[str, list[dict]], step: int) -> None:
    """Cut this rank's pieces and their optimizer state out of ``saved`` (records by tensor name)."""
    for piece, param in trainer.stage.named_pieces():
        with torch.no_grad():
            param.copy_(_cut(saved, piece, lambda r: r["value"]))
        keys = {k for r in saved[piece.name] for k in r["state"]}
        state = {}
        for key in keys:
            sample = saved[piece.name][0]["state"][key]
            if torch.is_tensor(sample) and sample.shape == saved[piece.name][0]["value"].shape:
                state[key] = _cut(saved, piece, lambda r, k=key: r["state"][k]).to(param.device, copy=True)
            else:  # a step counter: the same on every piece
                state[key] = sample.clone() if torch.is_tensor(sample) else sample
        if state:
            trainer.optimizer.state[param] = state
    trainer.step_index = step


def by_name(pieces: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for record in pieces:
        if not isinstance(record["piece"], Piece):
            record["piece"] = Piece(**{**record["piece"], "shape": tuple(record["piece"]["shape"])})
        out.setdefault(record["piece"].name, []).append(record)
    return out


def saved_pieces(directory: Path, world_size: int) -> dict[str, list[dict]]:
    pieces = []
    for rank in range(world_size):
        path = Path(directory) / _rank_file(rank)
        if not path.is_file():
            raise ConfigError(f"--resume {directory} lacks {path.name}: the checkpoint is incomplete")
        pieces += torch.load(path, map_location="cpu", weights_only=True)["pieces"]
    return by_name(pieces)


def full_tensor(records: list[dict], get=lambda r: r["value"]) -> torch.Tensor:
    """The whole tensor from saved pieces that together cover it."""
    first = records[0]["piece"]
    out = torch.empty(first.shape, dtype=get(records[0]).dtype)
    covered = torch.zeros(first.shape[first.dim], dtype=torch.bool)
    for r in records:
        p = r["piece"]
        out.narrow(p.dim, p.start, p.end - p.start).copy_(get(r))
        covered[p.start : p.end] = True
    if not covered.all():
        raise ConfigError(f"the checkpoint does not cover all of {first.name}")
    return out


def _cut(saved, piece: Piece, get) -> torch.Tensor:
    return full_tensor(saved[piece.name], get).narrow(piece.dim, piece.start, piece.end - piece.start)


def export_hf(checkpoint: Path, model_dir: Path, out: Path) -> Path:
    """A Hugging Face directory with the trained weights: config and tokenizer files copied
    from ``model_dir`` (a Hugging Face directory), tensors joined from the checkpoint."""
    checkpoint, model_dir, out = Path(checkpoint), Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} is not a Hugging Face directory: export needs its config.json")
    meta = json.loads((checkpoint / META).read_text())
    saved = saved_pieces(checkpoint, meta["world_size"])
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
            shutil.copy2(f, out / f.name)
    save_file({name: full_tensor(records).contiguous() for name, records in saved.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"
