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
import importlib.util
import math
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Mapping, get_args, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

import tomli_w


def rule_names() -> tuple[str, ...]:
    """The registered learning rules (``parallel_dkp.rules.RULES`` is the one list of them)."""
    from parallel_dkp.rules import RULES  # lazily: the rules package imports this module

    return tuple(RULES)


def __getattr__(name: str):
    if name == "RULE_NAMES":  # ``from parallel_dkp.config import RULE_NAMES`` keeps working
        return rule_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MODEL_NAMES = ("mlp", "conv2", "alexnet", "alexnet_small", "vit", "convdeep")
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
    channels_last: bool = False
    """Keep 4-D weights and activations in channels-last (NHWC) memory order: the layout the conv
    kernels of oneDNN (CPU) and cuDNN prefer. Measured on the 2-core CPU, one thread, batch 128:
    a bp step of conv2 22 % faster, convdeep 8 %. Results equal the default layout's up to float
    rounding. Activations cross ranks in the default layout."""
    keep_freed_memory: bool = True
    """glibc (Linux): serve tensors from the heap and keep freed memory for reuse, instead of
    mapping each large tensor fresh from the OS and unmapping it when freed (page faults on every
    step); what jemalloc or tcmalloc would give. Measured on the 2-core CPU: conv2 steps 1.3-1.6x
    faster, and far steadier. The process keeps its peak memory, as GPU caching allocators do.
    No effect elsewhere (``parallel_dkp.cpu_memory``)."""
    bind_cores: bool = True
    """CPU runs with several ranks on one host: bind each rank (its threads, gloo's included) to
    its own equal share of the cores it was started on, as MPI's ``--bind-to core`` does, and
    cap its intra-op threads at that share. Skipped where a launcher already gave a host's ranks
    different cores, where there are fewer cores than ranks, and on GPUs. On the 2-core VM it
    made 2-rank vit steps 11 % faster before receives were posted ahead, and is within that VM's
    noise since (``parallel_dkp.parallel.affinity``)."""
    checkpoint_every: int = 0
    """Also write a checkpoint every this many steps (0: only at each epoch end). Every rank
    writes its own shard; a run restarted with the same ``run.out_dir`` resumes from the newest."""
    keep_checkpoints: int = 2
    tensorboard: bool = False
    """Also log the metrics and alignment angles for TensorBoard, to ``run.out_dir/tensorboard``
    (needs ``pip install 'parallel_dkp[tensorboard]'``)."""
    on_nonfinite: str = "stop"
    """What a non-finite loss or update does: ``stop`` every rank (checked every ``log_every``
    steps and before each checkpoint; no checkpoint is written past it) or ``skip_batch`` (every
    rank drops that step's update; costs one host sync per step on GPUs)."""
    """How many of the newest complete checkpoints to keep (the final model is kept apart)."""


@dataclass(frozen=True)
class RuleConfig:
    """The learning rule and its options."""

    name: str = "dkp"
    """One of bp, bp_fc_only, fa, kp, dfa, dkp, drtp."""
    feedback_init: str = "kaiming_uniform"
    """Initialisation of feedback matrices: kaiming_uniform or kaiming_normal (the paper's and the
    authors' code: Kaiming with ReLU gain), or like_weight (the forward layer's own default
    init, U(±1/√fan_in); keeps FA/KP's chained error at BP's scale)."""


@dataclass(frozen=True)
class ModelConfig:
    """The network, as a list of blocks."""

    name: str = "conv2"
    """One of mlp, conv2, alexnet (224x224 inputs), alexnet_small (32x32 / 64x64 inputs), and two networks
    of equal blocks whose layer-parallel stages can cost the same: vit, convdeep."""
    widths: tuple[int, ...] = (256, 256, 256)
    """Hidden widths of ``mlp``."""
    batch_norm: bool = True
    """BN before every hidden activation (the paper needs it for DFA/DKP stability); in ``vit``, a
    LayerNorm on every transformer block's output, for the same reason."""
    dropout: float = 0.0
    """Dropout before AlexNet's two hidden FC layers (alexnet, alexnet_small; torchvision's place).
    The paper mentions only BN; the authors' AlexNet code uses 0.5, which the AlexNet configs set.
    Masks are drawn from each rank's own random stream, so a multi-rank run with dropout is not
    bit-identical to the single-process run (it is without)."""
    conv_padding: int = 1
    """Zero padding of conv2's 3x3 convolutions. Table 3's Linear(6272, 128) is 1 on 28x28
    Fashion-MNIST (28 → pool → 14·14·32) and 0 on 32x32 CIFAR-10 (32 → 30 → 28 → pool →
    14·14·32, as the authors' code does); the shipped configs set it so."""
    dim: int = 64
    """Token width of ``vit`` (must be divisible by ``heads``)."""
    heads: int = 4
    """Attention heads of ``vit``."""
    patch: int = 7
    """Side of ``vit``'s square patches; the image sides must be divisible by it (7: 16 tokens on
    28x28 Fashion-MNIST; use 4 or 8 on 32x32 CIFAR)."""
    depth: int = 4
    """Number of equal hidden blocks of ``vit`` (transformer blocks) and ``convdeep`` (3x3 conv
    blocks). The input layer (``vit``'s patch embedding, ``convdeep``'s stem) is a block of its own
    before them and the output block follows: ``depth + 2`` blocks."""
    width: int = 32
    """Channels of every ``convdeep`` convolution (``mlp`` keeps its own ``widths``)."""


AugmentCrop = Literal["pad", "random_resized"]
"""Values of ``data.augment_crop`` (``parallel_dkp.data.transforms.AUGMENT_CROPS`` implements them)."""


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
    """Random crop (``augment_crop``) + horizontal flip (p = 1/2) of every training image. The test
    loader never augments."""
    augment_crop: AugmentCrop = "pad"
    """The random crop of ``augment`` (ignored without it): ``pad`` crops ``image_size`` out of the
    image resized to ``image_size`` and zero-padded by 1/8 of each side (the usual small-image
    crop); ``random_resized`` is torchvision's ``RandomResizedCrop(image_size)`` of the stored
    image: a box of 8-100 % of its area, aspect ratio 3/4-4/3, resized to ``image_size`` (the
    authors' AlexNet code)."""
    test_crop_fraction: float = 1.0
    """Test images: resize the short side to ``image_size / test_crop_fraction`` pixels (rounded
    down, as timm's ``crop_pct``), then crop the centre ``image_size`` x ``image_size`` (the native
    size when ``image_size`` is 0). 0.875 at 224 is torchvision's ``Resize(256)`` +
    ``CenterCrop(224)``, the authors' AlexNet code. 1.0 = no crop: resize straight to
    ``image_size``. A fraction, so that one value fits every input size. Training images are not
    affected."""
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
    """Micro-batches per step and replica (M). ``data.batch_size`` must be divisible by
    ``replicas`` × M."""
    partition: tuple[int, ...] = ()
    """Blocks per stage, e.g. (2, 2); empty = balanced by measured per-block cost."""
    stages: int = 0
    """Pipeline stages (ranks per pipeline); 0 = chosen: the length of ``partition`` if given,
    else world size / ``replicas``, else as many as the blocks allow (the largest divisor of the
    world size that is at most the block count)."""
    replicas: int = 0
    """Data-parallel copies of the pipeline, each on its own shard of every batch, averaging each
    stage's gradients; 0 = chosen (world size / stages). stages × replicas = world size."""
    bucket_mb: float = 25.0
    """Size of the buckets in which a stage's gradients are averaged over its replicas."""
    schedule: str = "gpipe"
    """Backward pipeline for serial rules (bp, bp_fc_only, fa, kp): gpipe or 1f1b."""
    engine_on_one_stage: bool = False
    """Run the serial rules through torch.distributed.pipelining's ``schedule`` even when the
    pipeline has one stage (otherwise a plain loop over the micro-batches): ``bench`` measures the
    engine's own cost this way. Outside torchrun the process makes a group of itself for it."""
    error_messages: str = "auto"
    """How the direct rules' last stage sends each micro-batch's output error to the earlier
    stages: ``broadcast`` (one collective), ``sends`` (a send to each), ``auto`` (broadcast on NCCL,
    sends on gloo, where a collective costs the ranks' cores more host time per call)."""
    messages: bool = True
    """``false`` (benchmarks only; it does not train): the direct rules' stages exchange nothing.
    Each receives fixed activations and output errors of the right shapes the moment it asks, so
    a step measures what the stages' compute alone allows, without the messages' host costs and
    the waits for other stages (``parallel_dkp.parallel.transport.LocalTransport``)."""
    timeout_s: float = 300.0
    """Timeout of every collective; a dead peer fails the run within this time."""
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU), nccl or gloo."""


@dataclass(frozen=True)
class AnalysisConfig:
    """Measurements of what the rule learns (``parallel_dkp/analysis/alignment.py``)."""

    align_every: int = 0
    """Measure alignment angles every this many steps into ``alignment.jsonl`` (0 = never). Each
    measurement runs a shadow backprop pass on the step's batch, so keep it sparse."""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def validate(self) -> "Config":
        """Check values a user can get wrong; raise ValueError with the remedy."""
        _one_of("rule.name", self.rule.name, rule_names())
        _one_of("model.name", self.model.name, MODEL_NAMES)
        _one_of("data.name", self.data.name, DATA_NAMES)
        _one_of("rule.feedback_init", self.rule.feedback_init, ("kaiming_uniform", "kaiming_normal", "like_weight"))
        _one_of("parallel.schedule", self.parallel.schedule, ("gpipe", "1f1b"))
        _one_of("parallel.backend", self.parallel.backend, ("auto", "nccl", "gloo"))
        _one_of("parallel.error_messages", self.parallel.error_messages, ("auto", "broadcast", "sends"))
        _one_of("run.device", self.run.device, ("auto", "cpu", "cuda"))
        if not self.run.out_dir.strip():  # "" would write config, metrics and checkpoints into the cwd
            raise ValueError(
                f"run.out_dir = {self.run.out_dir!r} is empty; set the folder that receives the run's files, "
                "e.g. run.out_dir=runs/default"
            )
        for side in ("forward", "feedback"):
            opt: OptimizerConfig = getattr(self.optim, side)
            _one_of(f"optim.{side}.name", opt.name, ("sgd", "adam"))
            _one_of(f"optim.{side}.scheduler", opt.scheduler, ("none", "step"))
            _check_optimizer(f"optim.{side}", opt, default=getattr(OptimConfig(), side))
        _at_least("data.batch_size", self.data.batch_size, 1, "examples per training step", 128)
        if self.parallel.microbatches < 1 or self.data.batch_size % self.parallel.microbatches:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be a positive multiple of "
                f"parallel.microbatches ({self.parallel.microbatches}); change one of them"
            )
        _at_least("parallel.stages", self.parallel.stages, 0, "pipeline stages, 0 = chosen to fit", 0)
        _at_least("parallel.replicas", self.parallel.replicas, 0, "copies of the pipeline, 0 = chosen to fit", 0)
        if self.data.batch_size % (max(self.parallel.replicas, 1) * self.parallel.microbatches):
            per = max(self.parallel.replicas, 1) * self.parallel.microbatches
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be divisible by parallel.replicas "
                f"({self.parallel.replicas}) x parallel.microbatches ({self.parallel.microbatches}) = {per}: each "
                f"replica trains on an equal shard of every batch; set data.batch_size to a multiple of {per}"
            )
        if not self.parallel.bucket_mb > 0:
            raise ValueError(
                f"parallel.bucket_mb = {self.parallel.bucket_mb} must be > 0; set e.g. parallel.bucket_mb=25")
        _at_least("run.log_every", self.run.log_every, 1, "steps between metric reads", 50)
        _at_least("run.checkpoint_every", self.run.checkpoint_every, 0, "0 = a checkpoint at each epoch end only", 0)
        _one_of("run.on_nonfinite", self.run.on_nonfinite, ("stop", "skip_batch"))
        if self.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError(
                "run.tensorboard = true needs the tensorboard package: pip install 'parallel_dkp[tensorboard]', "
                "or set run.tensorboard=false"
            )
        if not 0.0 <= self.model.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.model.dropout}; set e.g. model.dropout=0.5")
        _at_least("model.conv_padding", self.model.conv_padding, 0, "zero padding of conv2's convolutions", 1)
        for key in ("dim", "heads", "patch", "depth", "width"):  # vit and convdeep sizes
            _at_least(f"model.{key}", getattr(self.model, key), 1, "a vit/convdeep size", getattr(ModelConfig(), key))
        if self.model.name == "vit" and self.model.dim % self.model.heads:
            raise ValueError(
                f"model.dim = {self.model.dim} must be divisible by model.heads = {self.model.heads} (each head "
                f"gets dim/heads channels); set e.g. model.dim={self.model.heads * 16} or model.heads=1"
            )
        _at_least("analysis.align_every", self.analysis.align_every, 0, "0 = no alignment measurements", 100)
        _at_least("run.keep_checkpoints", self.run.keep_checkpoints, 1, "newest checkpoints kept", 2)
        if self.rule.name == "bp_fc_only" and self.model.name == "mlp":
            raise ValueError(
                "rule.name = 'bp_fc_only' freezes convolutions, but model.name = 'mlp' has none (it would "
                "equal bp); use rule.name=bp, or a convolutional model (conv2, alexnet, alexnet_small)"
            )
        _at_least("run.epochs", self.run.epochs, 1, "an epoch is one pass over the training set", 1)
        if any(n < 1 for n in self.parallel.partition):
            raise ValueError(
                f"parallel.partition {list(self.parallel.partition)} has a rank with no block; "
                "every rank needs at least one block; remove the 0 or set parallel.partition=[] to balance by cost"
            )
        _check_run(self.run)
        _check_model(self.model)
        _check_data(self.data)
        _check_input_fits_model(self.data, self.model)
        _check_timeout(self.parallel.timeout_s)
        return self


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(value, allowed, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"{key} = {value!r} is not one of {', '.join(allowed)}{did_you_mean}; set one of them, "
                         f"e.g. {key}={hint[0] if hint else allowed[0]}")


# Every check below runs in ``load_config``, before any process group, dataset or network
# exists, so a bad value fails at once, on every rank, naming the key, the value and the fix.
# Types and unknown keys are already rejected by ``from_dict``.


def _at_least(key: str, value: int, low: int, meaning: str, example: Any) -> None:
    if value < low:
        raise ValueError(f"{key} = {value} must be >= {low} ({meaning}); set e.g. {key}={example}")


def _finite(key: str, value: float, example: Any) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{key} = {value} must be a finite number; set e.g. {key}={example}")


def _check_optimizer(key: str, opt: OptimizerConfig, default: OptimizerConfig) -> None:
    """Values torch would reject late (or accept and train nothing with) for ``optim.forward|feedback``."""
    for name in ("lr", "momentum", "weight_decay", "gamma"):
        _finite(f"{key}.{name}", getattr(opt, name), getattr(default, name))
    if opt.lr <= 0:
        fixed = " (rules with fixed or no feedback ignore it, so any positive value will do)"
        fixed = fixed if key.endswith("feedback") else ""
        raise ValueError(
            f"{key}.lr = {opt.lr} must be > 0 (0 trains nothing, a negative rate climbs the loss); "
            f"set e.g. {key}.lr={default.lr}{fixed}"
        )
    if not 0 <= opt.momentum < 1:
        raise ValueError(
            f"{key}.momentum = {opt.momentum} must be in [0, 1) (0 = plain SGD; at 1 or more the velocity "
            f"never decays); set e.g. {key}.momentum={default.momentum}"
        )
    if opt.weight_decay < 0:
        raise ValueError(
            f"{key}.weight_decay = {opt.weight_decay} must be >= 0 (0 = none); set e.g. "
            f"{key}.weight_decay={default.weight_decay}"
        )
    if len(opt.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in opt.betas):
        raise ValueError(
            f"{key}.betas = {list(opt.betas)} must be exactly two numbers in [0, 1) (Adam's decay rates of "
            f"the gradient mean and variance); set e.g. {key}.betas=[0.9, 0.999]"
        )
    _at_least(f"{key}.step_size", opt.step_size, 1, "epochs between two learning-rate decays", 1)
    if opt.gamma <= 0:
        raise ValueError(
            f"{key}.gamma = {opt.gamma} must be > 0 (StepLR multiplies the rate by it every step_size "
            f"epochs, usually a value in (0, 1]); set e.g. {key}.gamma=0.85, or {key}.scheduler=none"
        )


def _check_run(run: RunConfig) -> None:
    _at_least("run.seed", run.seed, 0, "seeds are non-negative", 0)
    _at_least("run.max_steps", run.max_steps, 0, "0 = the whole epoch, N = stop each epoch after N steps", 0)


def _check_model(model: ModelConfig) -> None:
    bad = [i for i, width in enumerate(model.widths) if width < 1]
    if bad:
        raise ValueError(
            f"model.widths = {list(model.widths)} has width {model.widths[bad[0]]} at index {bad[0]}; every "
            "hidden width must be >= 1; set e.g. model.widths=[256, 256]"
        )
    if model.name == "mlp" and not model.widths:
        raise ValueError("model.widths = [] is empty, but model.name = 'mlp' needs at least one hidden width; "
                         "set e.g. model.widths=[256, 256]")


def _check_data(data: DataConfig) -> None:
    _at_least("data.train_limit", data.train_limit, 0, "0 = all training examples", 0)
    _at_least("data.test_limit", data.test_limit, 0, "0 = all test examples", 0)
    _at_least("data.num_workers", data.num_workers, 0, "0 = load in the main process", 0)
    _at_least("data.image_size", data.image_size, 0, "0 = the native size", 0)
    _one_of("data.augment_crop", str(data.augment_crop), get_args(AugmentCrop))
    if not (math.isfinite(data.test_crop_fraction) and 0 < data.test_crop_fraction <= 1):
        raise ValueError(
            f"data.test_crop_fraction = {data.test_crop_fraction} must be in (0, 1] (the share of the test image's "
            "side kept by the centre crop; 1 = no crop); set e.g. data.test_crop_fraction=0.875 (Resize(256) + "
            "CenterCrop(224)) or 1"
        )
    if data.test_crop_fraction != 1 and data.name == "synthetic" and len(data.synthetic_shape) != 3:
        raise ValueError(
            f"data.test_crop_fraction crops images, but data.synthetic_shape = {list(data.synthetic_shape)} is not "
            "(C, H, W); set data.test_crop_fraction=1 or a shape like data.synthetic_shape=[1, 28, 28]"
        )
    _at_least("data.synthetic_size", data.synthetic_size, 1, "number of synthetic training examples", 512)
    _at_least("data.synthetic_classes", data.synthetic_classes, 2, "a classifier needs two classes", 10)
    if not data.synthetic_shape or any(d < 1 for d in data.synthetic_shape):
        raise ValueError(
            f"data.synthetic_shape = {list(data.synthetic_shape)} must be one or more sizes >= 1; "
            "set e.g. data.synthetic_shape=[1, 28, 28] (an image) or [64] (a vector)"
        )
    train_size = data.synthetic_size if data.name == "synthetic" else 0
    if data.train_limit:
        train_size = min(train_size, data.train_limit) if train_size else data.train_limit
    if 0 < train_size < data.batch_size:
        which = "data.train_limit" if train_size == data.train_limit else "data.synthetic_size"
        raise ValueError(
            f"{which} = {train_size} is smaller than data.batch_size = {data.batch_size}, so not one full "
            f"training batch can be formed; raise {which} or lower data.batch_size"
        )


# (C, H, W) of each dataset's examples at its native size; image folders vary.
_NATIVE_SHAPES = {
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "tiny_imagenet": (3, 64, 64),
}


def _check_input_fits_model(data: DataConfig, model: ModelConfig) -> None:
    """Reject inputs the model cannot take, where the config alone fixes the input's shape."""
    if data.name == "synthetic":
        shape, source = tuple(data.synthetic_shape), f"data.synthetic_shape = {list(data.synthetic_shape)}"
        if len(shape) != 3 and (data.image_size or data.augment):
            key = "data.image_size" if data.image_size else "data.augment"
            raise ValueError(
                f"{key} needs images (C, H, W), but {source} is not one; set {key}="
                f"{0 if data.image_size else 'false'} or a shape like data.synthetic_shape=[1, 28, 28]"
            )
    elif data.name in _NATIVE_SHAPES:
        shape, source = _NATIVE_SHAPES[data.name], f"data.name = {data.name!r}"
    else:
        shape, source = None, ""
    if data.image_size:
        shape = (shape[0] if shape else 3, data.image_size, data.image_size)
        source = f"data.image_size = {data.image_size}"
    if shape is None or model.name == "mlp":  # an image folder at its own size; mlp takes any shape
        return
    if len(shape) != 3:
        raise ValueError(
            f"model.name = {model.name!r} needs images (C, H, W), but {source} is not one; set e.g. "
            "data.synthetic_shape=[1, 28, 28], or model.name=mlp"
        )
    h, w = shape[1], shape[2]
    size_key = source.split(" = ")[0]
    if model.name == "conv2" and (h < 2 or w < 2):
        raise ValueError(
            f"model.name = 'conv2' max-pools by 2, so images must be at least 2x2, but {source} gives "
            f"{h}x{w}; set a larger {size_key}"
        )
    if model.name == "alexnet_small" and (h % 8 or w % 8):
        raise ValueError(
            f"model.name = 'alexnet_small' max-pools three times by 2, so image sides must be multiples of 8, "
            f"but {source} gives {h}x{w}; set data.image_size=32 (or 64), or model.name=conv2"
        )
    if model.name == "alexnet" and (h, w) != (224, 224):
        raise ValueError(
            f"model.name = 'alexnet' needs 224x224 images, but {source} gives {h}x{w}; set "
            "data.image_size=224, or use model.name=alexnet_small for 32x32/64x64 images"
        )


def _check_timeout(timeout_s: float) -> None:
    ok = math.isfinite(timeout_s) and timeout_s > 0
    if ok:
        try:
            timedelta(seconds=timeout_s)
        except OverflowError:
            ok = False
    if not ok:
        raise ValueError(
            f"parallel.timeout_s = {timeout_s} must be a positive number of seconds (how long a collective "
            "waits for a peer before the run fails); set e.g. parallel.timeout_s=300"
        )


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a TOML file (or the defaults), merge ``[per_rule.<rule>]``, then apply ``--set``s."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            inside = sorted(p.name for p in path.glob("*.toml"))[:5]
            holds = f" (it holds {', '.join(inside)})" if inside else ""
            raise ValueError(
                f"config file {str(path)!r} is a directory, not a TOML file{holds}; "
                "pass a file such as configs/default.toml"
            )
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
        if name not in rule_names():
            raise ValueError(f"[per_rule.{name}] names no rule; rules are {', '.join(rule_names())}")
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
