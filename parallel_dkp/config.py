"""Typed configuration: frozen dataclasses, a TOML loader and ``--set a.b=c`` overrides.

A config file is data, never code. Every section is a dataclass below; an unknown key is
an error that names the key and the keys that are allowed. One file can describe a whole
experiment family: ``[per_rule.<rule>]`` tables are merged over the base config when
``rule.name`` is that rule, and ``--set`` overrides are applied last, so they always win.

Example::

    [rule]
    name = "dkp"

    [per_rule.bp.optim.forward]
    lr = 0.1
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

import tomli_w

RULE_NAMES = ("bp", "bp_fc_only", "fa", "kp", "dfa", "dkp", "drtp")
MODEL_NAMES = ("mlp", "conv2", "alexnet", "alexnet_small")
DATA_NAMES = ("fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "image_folder", "synthetic")


@dataclass(frozen=True)
class RunConfig:
    """Where and how long to run."""

    seed: int = 0
    """Seed of the initial network (per block), the data order and everything random."""
    epochs: int = 1
    out_dir: str = "runs/default"
    """Receives ``config.toml`` and ``metrics.jsonl``; ``{rule}`` is replaced by ``rule.name``."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``."""
    max_steps: int = 0
    """Stop each epoch after this many training steps (0 = the whole epoch). For smoke runs."""
    progress: bool = True
    """Show a rich progress bar (on the rank that owns the loss only)."""
    log_every: int = 50
    """Read the running loss and accuracy back from the device every this many steps (and at
    each epoch end) to update the progress bar and check for NaNs. Each read makes the host
    wait for the device, so on GPUs keep it well above 1."""
    profile: bool = False
    """Time every phase of every step (forward, update, wait, send, optimizer) per rank, with
    CUDA events on GPUs, and write ``phases.json``. Off by default: it costs a little."""


@dataclass(frozen=True)
class RuleConfig:
    """The learning rule and its options."""

    name: str = "dkp"
    """One of bp, bp_fc_only, fa, kp, dfa, dkp, drtp."""
    feedback_init: str = "kaiming_uniform"
    """Initialisation of feedback matrices: kaiming_uniform or kaiming_normal."""


@dataclass(frozen=True)
class ModelConfig:
    """The network, as a list of blocks."""

    name: str = "conv2"
    """One of mlp, conv2, alexnet (224x224 inputs), alexnet_small (32x32 / 64x64 inputs)."""
    widths: tuple[int, ...] = (256, 256, 256)
    """Hidden widths of ``mlp``."""
    batch_norm: bool = True
    """BN before every hidden activation (the paper needs it for DFA/DKP stability)."""


@dataclass(frozen=True)
class DataConfig:
    """The dataset and its loader."""

    name: str = "fashion_mnist"
    root: str = ""
    """Directory of the dataset; empty = the default place for that dataset."""
    batch_size: int = 128
    train_limit: int = 0
    """Use only the first N training examples (0 = all)."""
    test_limit: int = 0
    """Use only the first N test examples (0 = all)."""
    download: bool = False
    """Allow torchvision to download Fashion-MNIST/CIFAR when they are not on disk."""
    augment: bool = False
    """Random crop (zero padding of 1/8 of the side) + horizontal flip on training images."""
    num_workers: int = 0
    image_size: int = 0
    """Resize images to this size (0 = native size). AlexNet needs 224."""
    synthetic_shape: tuple[int, ...] = (1, 28, 28)
    """Shape of one ``synthetic`` example (C, H, W) or (D,)."""
    synthetic_classes: int = 10
    synthetic_size: int = 512
    """Number of ``synthetic`` training examples (test set is a quarter of it)."""


@dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer and its learning-rate schedule."""

    name: str = "sgd"
    """sgd or adam."""
    lr: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "none"
    """none or step (StepLR, stepped once per epoch)."""
    step_size: int = 1
    gamma: float = 0.85


@dataclass(frozen=True)
class OptimConfig:
    """Separate optimizers for forward weights and feedback matrices (paper §3.1)."""

    forward: OptimizerConfig = field(default_factory=OptimizerConfig)
    feedback: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-4, scheduler="step", gamma=0.85)
    )


@dataclass(frozen=True)
class ParallelConfig:
    """How the block list is split across ranks and micro-batches."""

    microbatches: int = 1
    """Micro-batches per step (M). ``data.batch_size`` must be divisible by it."""
    partition: tuple[int, ...] = ()
    """Blocks per rank, e.g. (2, 2); empty = balanced by measured per-block cost."""
    schedule: str = "gpipe"
    """Backward pipeline for serial rules (bp, bp_fc_only, fa, kp): gpipe or 1f1b."""
    timeout_s: float = 300.0
    """Timeout of every collective; a dead peer fails the run within this time."""
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU), nccl or gloo."""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "Config":
        """Check values a user can get wrong; raise ValueError with the remedy."""
        _one_of("rule.name", self.rule.name, RULE_NAMES)
        _one_of("model.name", self.model.name, MODEL_NAMES)
        _one_of("data.name", self.data.name, DATA_NAMES)
        _one_of("rule.feedback_init", self.rule.feedback_init, ("kaiming_uniform", "kaiming_normal"))
        _one_of("parallel.schedule", self.parallel.schedule, ("gpipe", "1f1b"))
        _one_of("parallel.backend", self.parallel.backend, ("auto", "nccl", "gloo"))
        _one_of("run.device", self.run.device, ("auto", "cpu", "cuda"))
        for side in ("forward", "feedback"):
            opt: OptimizerConfig = getattr(self.optim, side)
            _one_of(f"optim.{side}.name", opt.name, ("sgd", "adam"))
            _one_of(f"optim.{side}.scheduler", opt.scheduler, ("none", "step"))
            if opt.lr < 0:
                raise ValueError(f"optim.{side}.lr must be >= 0, got {opt.lr}")
        if self.data.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.data.batch_size}")
        if self.parallel.microbatches < 1 or self.data.batch_size % self.parallel.microbatches:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be a positive multiple of "
                f"parallel.microbatches ({self.parallel.microbatches}); change one of them"
            )
        if self.run.log_every < 1:
            raise ValueError(f"run.log_every must be >= 1 (steps between metric reads), got {self.run.log_every}")
        if self.rule.name == "bp_fc_only" and self.model.name == "mlp":
            raise ValueError(
                "rule.name = 'bp_fc_only' freezes convolutions, but model.name = 'mlp' has none (it would "
                "equal bp); use rule.name=bp, or a convolutional model (conv2, alexnet, alexnet_small)"
            )
        if self.run.epochs < 1:
            raise ValueError(f"run.epochs must be >= 1, got {self.run.epochs}")
        if any(n < 1 for n in self.parallel.partition):
            raise ValueError(
                f"parallel.partition {list(self.parallel.partition)} has a rank with no block; "
                "every rank needs at least one block"
            )
        return self


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(value, allowed, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"{key} = {value!r} is not one of {', '.join(allowed)}{did_you_mean}")


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a TOML file (or the defaults), merge ``[per_rule.<rule>]``, then apply ``--set``s."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist; see configs/ for examples")
        with path.open("rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"{path}: invalid TOML: {err}") from None
    per_rule = raw.pop("per_rule", {})
    if not isinstance(per_rule, Mapping):
        raise ValueError("[per_rule] must hold one table per rule, e.g. [per_rule.bp.optim.forward]")
    for name, section in per_rule.items():
        if name not in RULE_NAMES:
            raise ValueError(f"[per_rule.{name}] names no rule; rules are {', '.join(RULE_NAMES)}")
        if not isinstance(section, Mapping):
            raise ValueError(f"[per_rule.{name}] must be a table of config sections, got {section!r}")
        if "name" in section.get("rule", {}):
            raise ValueError(f"[per_rule.{name}] may not set rule.name; choose the rule with rule.name")
        # Validate every rule's section now, so a typo surfaces whichever rule is run.
        from_dict(Config, _deep_merge(raw, section))
    sets = [parse_override(item) for item in overrides]

    # The rule can be chosen by --set, so find it before merging its section.
    probe = _deep_copy(raw)
    for keys, value in sets:
        _assign(probe, keys, value)
    rule_section = probe.get("rule", {})
    rule_name = rule_section.get("name", RuleConfig.name) if isinstance(rule_section, Mapping) else None

    merged = _deep_merge(raw, per_rule.get(rule_name, {}))
    for keys, value in sets:
        _assign(merged, keys, value)
    cfg = from_dict(Config, merged)
    if "{rule}" in cfg.run.out_dir:  # one file, one folder per rule
        run = dataclasses.replace(cfg.run, out_dir=cfg.run.out_dir.replace("{rule}", cfg.rule.name))
        cfg = dataclasses.replace(cfg, run=run)
    return cfg.validate()


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as a TOML value, else as a string."""
    if "=" not in item:
        raise ValueError(f"--set {item!r} must look like section.key=value, e.g. run.epochs=3")
    key, text = item.split("=", 1)
    keys = [k.strip() for k in key.strip().split(".")]
    if len(keys) < 2 or not all(keys):
        raise ValueError(f"--set {item!r}: the key must be dotted, like data.batch_size")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word such as dkp
    return keys, value


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are errors."""
    if not isinstance(data, Mapping):
        raise ValueError(f"[{prefix.rstrip('.')}] must be a table, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            did_you_mean = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise ValueError(
                f"unknown config key '{prefix}{key}'{did_you_mean} "
                f"(allowed in [{prefix.rstrip('.') or 'top level'}]: {', '.join(sorted(known))})"
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    origin = getattr(hint, "__origin__", None)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        item_type = hint.__args__[0]
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (
        hint is int and isinstance(value, bool)
    ):
        raise ValueError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def _assign(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {'.'.join(keys)}: {k!r} is a value, not a section")
    node[keys[-1]] = value


def _deep_merge(base: Mapping, over: Mapping) -> dict:
    out = _deep_copy(base)
    for k, v in over.items():
        below = out.get(k, {})
        out[k] = _deep_merge(below, v) if isinstance(v, Mapping) and isinstance(below, Mapping) else v
    return out


def _deep_copy(tree: Mapping) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain TOML-able data (tuples become lists)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config, so a result can always be re-run exactly."""
    Path(path).write_text(tomli_w.dumps(to_dict(cfg)))
