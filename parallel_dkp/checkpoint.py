"""Checkpoints: one shard per rank, a manifest written last, exact resume, any partition.

Layout under ``run.out_dir``::

    checkpoints/
      step-00000120/
        shard-00.pt  shard-01.pt ...   one per pipeline stage: its blocks, optimizers, RNG states
        manifest.json                  written last, by the reporting rank, after every shard is on disk

With several data-parallel replicas (``parallel.replicas``) the replicas of a stage hold the
same parameters, buffers and optimizer state (their gradients and BN statistics are averaged
every step), so replica 0 writes the stage's shard, carrying every replica's RNG
state.

A checkpoint directory without ``manifest.json`` is incomplete and ignored. Every file is
written atomically (temporary file, ``fsync``, ``rename``), so a crash at any moment leaves
either the previous state or the new one.

Everything in a shard is keyed by *global* names: ``blocks.{j}.…`` for parameters, buffers and
feedback matrices (``Stage.global_state_dict``), and the same names for optimizer state. So a
checkpoint written by one partition loads into any other (trained on 4 ranks, evaluated on 1):
each rank reads the shards that hold its blocks.

Why not ``torch.distributed.checkpoint``: its save and load are collectives over one process
group layout, while we also load on a single process with no group at all (evaluation, tests);
our state is a few small per-stage dictionaries, already keyed globally; and the manifest also
carries the training position and the loss sums of a half-finished epoch, which are plain
Python data. Plain ``torch.save`` shards with an explicit manifest keep that simple.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from parallel_dkp.config import Config, to_dict
from parallel_dkp.optim import Optimizers
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.parallel.stage import Stage

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)$")

# Config keys that may change between an interrupted run and its resumption: how it is laid
# out and shown, not what it computes.
_RESUMABLE_CHANGES = {
    "parallel": None,  # the whole section: any partition, schedule or rank count
    "analysis": None,  # measurements restore everything they touch
    "run": {"epochs", "progress", "log_every", "profile", "checkpoint_every", "keep_checkpoints", "device",
            "out_dir", "on_nonfinite", "tensorboard", "keep_freed_memory", "bind_cores"},
}


@dataclass
class Position:
    """Where training stands: ``epoch`` (1-based) and the steps done in it, and in all."""

    epoch: int = 1
    step: int = 0
    global_step: int = 0
    sums: dict[str, Any] = field(default_factory=dict)
    """The running epoch's loss sums and seconds (last rank), so a resumed epoch reports the
    same numbers as an uninterrupted one."""


def save(out_dir: Path, *, cfg: Config, ctx: DistContext, stage: Stage, optimizers: Optimizers,
         partition: list[range], position: Position, keep: int) -> Path:
    """Write this stage's shard (replica 0 of each stage); the reporting rank then writes the
    manifest and prunes old ones.

    Collective: every rank calls it at the same step.
    """
    directory = Path(out_dir) / "checkpoints" / f"step-{position.global_step:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    rng = _rng_state()
    rngs = [rng]
    if ctx.replica_group is not None:  # every replica's stream, so that dropout resumes exactly
        rngs = [None] * ctx.replicas
        torch.distributed.all_gather_object(rngs, rng, group=ctx.replica_group)
    if ctx.replica == 0:
        shard = {
            "blocks": [stage.indices.start, stage.indices.stop],
            "model": {k: v.detach().cpu() for k, v in stage.global_state_dict().items()},
            "optimizers": optimizers_state(stage, optimizers),
            "rng": rng,
            "rng_replicas": rngs,
        }
        _atomic_save(shard, directory / _shard_name(ctx.stage))
    ctx.barrier()  # every shard is on disk before the manifest says the checkpoint exists
    if ctx.reports:
        manifest = {
            "global_step": position.global_step,
            "position": asdict(position),
            "world_size": ctx.world_size,
            "stages": ctx.stages,
            "replicas": ctx.replicas,
            "partition": [[r.start, r.stop] for r in partition],
            "shards": [_shard_name(stage) for stage in range(ctx.stages)],
            "config": to_dict(cfg),
            "torch": str(torch.__version__),
        }
        _atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
        _prune(Path(out_dir) / "checkpoints", keep)
    ctx.barrier()
    return directory


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir`` (one with a manifest), or ``None``."""
    complete = _complete(Path(out_dir) / "checkpoints")
    return complete[-1] if complete else None


class CheckpointError(ValueError):
    """A checkpoint on disk cannot be used: a damaged or missing file, or another model's weights."""


_MANIFEST_KEYS = {"position", "partition", "shards", "config"}


def _damaged(directory: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {directory} is damaged: {problem}; delete that folder (rm -r {directory}) to resume from "
        "the checkpoint before it, if any, or pass --no-resume to start over in run.out_dir"
    )


def read_manifest(directory: Path) -> dict:
    """The manifest of checkpoint ``directory``; CheckpointError (naming the file and the fix) when damaged."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise _damaged(Path(directory), f"cannot read {path} ({err})") from None
    if not isinstance(manifest, dict) or not _MANIFEST_KEYS <= set(manifest):
        missing = sorted(_MANIFEST_KEYS - set(manifest)) if isinstance(manifest, dict) else sorted(_MANIFEST_KEYS)
        raise _damaged(Path(directory), f"{path} lacks {', '.join(missing)}")
    return manifest


def config_differences(saved: dict, cfg: Config) -> list[str]:
    """``key: old -> new`` for every value that differs between a checkpoint's config and
    ``cfg``, ignoring the keys a resumed run may change (layout, display, epochs)."""
    defaults = _flatten(json.loads(json.dumps(to_dict(Config()))))
    # A key the code gained after the checkpoint was written counts as its default, so that a
    # new option never makes an old run un-resumable.
    old = {**defaults, **_flatten(json.loads(json.dumps(saved)))}
    new = _flatten(json.loads(json.dumps(to_dict(cfg))))
    found = []
    for key in sorted(set(old) | set(new)):
        section, _, name = key.partition(".")
        allowed = _RESUMABLE_CHANGES.get(section, set())
        if allowed is None or name.split(".")[0] in allowed:
            continue
        if old.get(key) != new.get(key):
            found.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return found


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load(directory: Path, *, stage: Stage, optimizers: Optimizers | None, device: torch.device,
         restore_rng: bool = True, replica: int = 0, replicas: int = 1) -> Position:
    """Load the parts of checkpoint ``directory`` that this stage owns, from whichever shards hold
    them; returns the saved position. RNG states are restored only when the layout is unchanged
    (the same stages, and the same number of ``replicas``: replica ``replica`` takes its own)."""
    manifest = read_manifest(directory)
    own = set(stage.indices)
    model: dict[str, torch.Tensor] = {}
    optim_states: list[dict] = []
    rng = None
    for (start, stop), name in zip(manifest["partition"], manifest["shards"]):
        if not own & set(range(start, stop)):
            continue
        path = Path(directory) / name
        try:
            shard = torch.load(path, map_location="cpu", weights_only=False)
            model.update(shard["model"])
            optim_states.append(shard["optimizers"])
            streams = shard.get("rng_replicas", [shard["rng"]])
            if (start, stop) == (stage.indices.start, stage.indices.stop) and len(streams) == replicas:
                rng = streams[replica]
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, KeyError, TypeError) as err:
            # truncated or garbage file (torch's zip reader raises RuntimeError), missing file, another format
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise _damaged(Path(directory), f"cannot load shard {path} ({type(err).__name__}: {reason})") from None
    try:
        stage.load_global_state_dict(model)
    except RuntimeError as err:  # load_state_dict's size mismatch: the checkpoint is another network's
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(
            f"checkpoint {directory} holds another network ({first}); use the config it was trained with, "
            f"e.g. --config {Path(directory).parent.parent / 'config.toml'}"
        ) from None
    if optimizers is not None:
        load_optimizers_state(stage, optimizers, optim_states)
    if restore_rng and rng is not None:
        _set_rng_state(rng, device)
    try:
        return Position(**manifest["position"])
    except TypeError as err:
        raise _damaged(Path(directory), f"its manifest's position is not one ({err})") from None


# --------------------------------------------------------------------------- optimizer state


def optimizers_state(stage: Stage, optimizers: Optimizers) -> dict:
    """Both optimizers' state keyed by global parameter name, and the schedulers' state."""
    names = stage.global_parameter_names()
    out: dict[str, Any] = {"schedulers": {k: s.state_dict() for k, s in optimizers.schedulers.items()}}
    for side in ("forward", "feedback"):
        opt = getattr(optimizers, side)
        if opt is None:
            out[side] = None
            continue
        params = [p for group in opt.param_groups for p in group["params"]]
        state = opt.state_dict()
        out[side] = {
            "state": {names[id(params[i])]: value for i, value in state["state"].items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
        }
    return out


def load_optimizers_state(stage: Stage, optimizers: Optimizers, saved: list[dict]) -> None:
    """Restore optimizer state from one or more shards' ``optimizers_state`` (any partition)."""
    names = stage.global_parameter_names()
    for side in ("forward", "feedback"):
        opt = getattr(optimizers, side)
        parts = [s[side] for s in saved if s.get(side) is not None]
        if opt is None or not parts:
            continue
        by_name = {name: value for part in parts for name, value in part["state"].items()}
        params = [p for group in opt.param_groups for p in group["params"]]
        state = {i: by_name[names[id(p)]] for i, p in enumerate(params) if names[id(p)] in by_name}
        groups, start = [], 0
        for group, saved_group in zip(opt.param_groups, parts[0]["groups"]):
            groups.append({**saved_group, "params": list(range(start, start + len(group["params"])))})
            start += len(group["params"])
        opt.load_state_dict({"state": state, "param_groups": groups})
    schedulers = next((s["schedulers"] for s in saved if s.get("schedulers")), {})
    for key, scheduler in optimizers.schedulers.items():
        if key in schedulers:
            scheduler.load_state_dict(schedulers[key])


# --------------------------------------------------------------------------- files


def _shard_name(rank: int) -> str:
    return f"shard-{rank:02d}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir()
             if (m := _STEP_DIR.search(d.name)) and (d / MANIFEST).is_file()]
    return [d for _, d in sorted(found)]


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and incomplete leftovers."""
    complete = _complete(root)
    newest = complete[-1] if complete else None
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for d in root.iterdir():  # incomplete directories older than the newest complete one
        m = _STEP_DIR.search(d.name)
        if m and not (d / MANIFEST).is_file() and newest is not None and d.name < newest.name:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- RNG


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
