"""Bad config values fail in ``load_config``: before any process group, dataset or network exists,
on every rank, once, with a message that names the key, the bad value and what to set instead.

Each case below was once a hole: a value torch accepted and trained nothing with, crashed on
after a whole epoch, or rejected with its own text (no key named, or a C++ stack dump).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from multirank import free_port

from parallel_dkp.config import load_config

SYNTH = "data.name=synthetic"
MLP = "model.name=mlp"

# (overrides, the key the message must name, the bad value as the message shows it)
CASES = {
    # optimizers: torch's own errors name no key, StepLR(step_size=0) fails only after an epoch
    "step_size=0": (["optim.feedback.step_size=0"], "optim.feedback.step_size", "0"),
    "step_size<0": (["optim.forward.step_size=-2"], "optim.forward.step_size", "-2"),
    "gamma<0": (["optim.feedback.gamma=-0.5"], "optim.feedback.gamma", "-0.5"),
    "gamma=0": (["optim.feedback.gamma=0"], "optim.feedback.gamma", "0.0"),
    "betas-short": (["optim.feedback.betas=[0.9]"], "optim.feedback.betas", "[0.9]"),
    "betas-long": (["optim.forward.betas=[0.9, 0.99, 0.999]"], "optim.forward.betas", "[0.9, 0.99, 0.999]"),
    "betas=1": (["optim.feedback.betas=[0.9, 1.0]"], "optim.feedback.betas", "[0.9, 1.0]"),
    "betas<0": (["optim.feedback.betas=[-0.1, 0.999]"], "optim.feedback.betas", "[-0.1, 0.999]"),
    "momentum<0": (["optim.forward.momentum=-0.1"], "optim.forward.momentum", "-0.1"),
    "momentum>=1": (["optim.forward.momentum=1"], "optim.forward.momentum", "1.0"),
    "weight_decay<0": (["optim.forward.weight_decay=-1e-4"], "optim.forward.weight_decay", "-0.0001"),
    "feedback-weight_decay<0": (["optim.feedback.weight_decay=-1"], "optim.feedback.weight_decay", "-1.0"),
    "lr=0": (["optim.forward.lr=0"], "optim.forward.lr", "0.0"),
    "lr<0": (["optim.forward.lr=-0.1"], "optim.forward.lr", "-0.1"),
    "feedback-lr=0": (["optim.feedback.lr=0"], "optim.feedback.lr", "0.0"),
    "lr=nan": (["optim.forward.lr=nan"], "optim.forward.lr", "nan"),
    "lr=inf": (["optim.feedback.lr=inf"], "optim.feedback.lr", "inf"),
    # run: max_steps < 0 trained nothing and exited 0
    "max_steps<0": (["run.max_steps=-1"], "run.max_steps", "-1"),
    "seed<0": (["run.seed=-1"], "run.seed", "-1"),
    "epochs=0": (["run.epochs=0"], "run.epochs", "0"),
    "log_every=0": (["run.log_every=0"], "run.log_every", "0"),
    # data
    "train_limit<0": (["data.train_limit=-1"], "data.train_limit", "-1"),
    "test_limit<0": (["data.test_limit=-5"], "data.test_limit", "-5"),
    "num_workers<0": (["data.num_workers=-1"], "data.num_workers", "-1"),
    "image_size<0": (["data.image_size=-8"], "data.image_size", "-8"),
    "synthetic_size=0": ([SYNTH, "data.synthetic_size=0"], "data.synthetic_size", "0"),
    "synthetic_classes=1": ([SYNTH, "data.synthetic_classes=1"], "data.synthetic_classes", "1"),
    "synthetic_shape-zero": ([SYNTH, "data.synthetic_shape=[1, 0, 28]"], "data.synthetic_shape", "[1, 0, 28]"),
    "synthetic_shape-empty": ([SYNTH, "data.synthetic_shape=[]"], "data.synthetic_shape", "[]"),
    "train_limit<batch": (["data.train_limit=10", "data.batch_size=16"], "data.train_limit", "10"),
    "synthetic_size<batch": ([SYNTH, "data.synthetic_size=8", "data.batch_size=16"], "data.synthetic_size", "8"),
    "batch_size=0": (["data.batch_size=0"], "data.batch_size", "0"),
    # parallel
    "microbatches=0": (["parallel.microbatches=0"], "parallel.microbatches", "0"),
    "microbatches-not-dividing": (["data.batch_size=10", "parallel.microbatches=3"], "parallel.microbatches", "3"),
    "partition-empty-rank": (["parallel.partition=[2, 0]"], "parallel.partition", "[2, 0]"),
    # timeout_s <= 0 gave a C++ stack dump at the first collective
    "timeout_s=0": (["parallel.timeout_s=0"], "parallel.timeout_s", "0.0"),
    "timeout_s<0": (["parallel.timeout_s=-5"], "parallel.timeout_s", "-5.0"),
    "timeout_s=inf": (["parallel.timeout_s=inf"], "parallel.timeout_s", "inf"),
    "timeout_s=huge": (["parallel.timeout_s=1e16"], "parallel.timeout_s", "1e+16"),
    # model
    "widths-zero": ([MLP, "model.widths=[256, 0]"], "model.widths", "[256, 0]"),
    "widths-negative": (["model.widths=[-4]"], "model.widths", "[-4]"),
    "widths-empty-mlp": ([MLP, "model.widths=[]"], "model.widths", "[]"),
    "bp_fc_only-on-mlp": ([MLP, "rule.name=bp_fc_only"], "rule.name", "bp_fc_only"),
    # an input the model cannot take, where the config alone fixes the input's shape
    "conv2-on-vector": ([SYNTH, "data.synthetic_shape=[64]"], "data.synthetic_shape", "[64]"),
    "conv2-1-pixel-high": ([SYNTH, "data.synthetic_shape=[1, 1, 28]"], "data.synthetic_shape", "1x28"),
    "conv2-image_size=1": (["data.image_size=1"], "data.image_size", "1x1"),
    "alexnet_small-not-8": ([SYNTH, "model.name=alexnet_small", "data.synthetic_shape=[3, 20, 20]"],
                            "data.synthetic_shape", "20x20"),
    "alexnet_small-image_size": (["data.name=cifar10", "model.name=alexnet_small", "data.image_size=36"],
                                 "data.image_size", "36x36"),
    "alexnet-native-cifar": (["data.name=cifar10", "model.name=alexnet"], "data.image_size=224", "32x32"),
    "augment-vector": ([SYNTH, MLP, "data.synthetic_shape=[64]", "data.augment=true"], "data.augment", "[64]"),
    "resize-vector": ([SYNTH, MLP, "data.synthetic_shape=[64]", "data.image_size=8"], "data.image_size", "[64]"),
}


@pytest.mark.parametrize("overrides,key,shown", CASES.values(), ids=CASES.keys())
def test_bad_value_is_a_value_error_naming_key_value_and_fix(overrides, key, shown):
    """Pinpoints a config value that passes ``load_config`` (so it fails late, mid-run or never),
    or whose message does not name the key, show the bad value or say what to set."""
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert key in message, message
    assert shown in message, message
    assert re.search(r"\b(set|use|raise|lower|change|remove)\b", message), f"no remedy in: {message}"


# A suggestion such as "set e.g. optim.feedback.step_size=1": a dotted key, "=", a value or a [list].
_SUGGESTION = re.compile(r"\b([a-z_]+\.[a-z_.]+)=(\[[^\]]*\]|[^\s,;)]+)")


def _suggestion(overrides) -> tuple[str, str] | None:
    """The first "key=value" a case's error message suggests, if it suggests a value."""
    try:
        load_config(None, overrides)
    except ValueError as err:
        found = _SUGGESTION.findall(str(err))
        return found[0] if found else None
    return None


# Only the cases whose message suggests a value (the others name what to change instead).
SUGGESTING = {name: (case[0], _suggestion(case[0])) for name, case in CASES.items() if _suggestion(case[0])}


def test_most_messages_suggest_a_value():
    """Pinpoints messages losing their concrete "set key=value" remedies (or this file's regex
    no longer finding them), which would quietly empty the test below."""
    assert len(SUGGESTING) >= len(CASES) - 8, sorted(set(CASES) - set(SUGGESTING))


@pytest.mark.parametrize("overrides,suggestion", SUGGESTING.values(), ids=SUGGESTING.keys())
def test_the_suggested_value_is_accepted(overrides, suggestion):
    """Pinpoints an error message whose own "set e.g. key=value" suggestion would be rejected too."""
    fixed_key, value = suggestion
    rest = [o for o in overrides if o.split("=", 1)[0] != fixed_key]
    load_config(None, [*rest, f"{fixed_key}={value}"])


def test_config_that_is_a_directory_says_so(tmp_path):
    """Pinpoints ``--config some/dir`` being reported as a missing file (it exists, it is a directory)."""
    (tmp_path / "a.toml").write_text("")
    with pytest.raises(ValueError) as err:
        load_config(tmp_path)
    message = str(err.value)
    assert "is a directory" in message and "configs/default.toml" in message and "a.toml" in message
    assert "does not exist" not in message


# --------------------------------------------------------------------------- the command line


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _cli(*args: str, timeout: float = 60, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "parallel_dkp", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(**env))
    return proc, time.perf_counter() - start


@pytest.mark.parametrize(
    "args,key",
    [
        (["--set", "optim.feedback.step_size=0"], "optim.feedback.step_size"),
        (["--set", "run.max_steps=-1"], "run.max_steps"),
        (["--set", "parallel.timeout_s=0"], "parallel.timeout_s"),
        (["--set", "optim.forward.betas=[0.9]"], "optim.forward.betas"),
        (["--config", "configs"], "is a directory"),
    ],
    ids=["step_size", "max_steps", "timeout_s", "betas", "config-dir"],
)
def test_cli_rejects_bad_config_fast_before_any_data(tmp_path, args, key):
    """Pinpoints a bad config that the CLI reports late (after data loading: the dataset below does not
    exist, so reaching it would print its path), slowly, with a traceback, or with another exit code."""
    nowhere = tmp_path / "nowhere"
    proc, seconds = _cli("train", *args, "--set", "data.name=cifar10", "--set", f"data.root={nowhere}",
                         "--set", f"run.out_dir={tmp_path / 'out'}")
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert text.startswith("config error:"), text
    assert key in text and "Traceback" not in text
    assert "nowhere" not in text, "the dataset was looked for before the config was checked"
    assert not (tmp_path / "out").exists()
    assert seconds < 20, f"took {seconds:.1f} s to reject a config value"


def test_every_rank_fails_once_on_its_own_without_waiting_for_peers(tmp_path):
    """Pinpoints a bad config that is checked only on some ranks, reported more than once per rank,
    or checked after the process group forms (each rank would then wait for its peer, which is never
    started here, until parallel.timeout_s). The two ranks are started as torchrun would start them."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "parallel_dkp", "train", "--set", "optim.feedback.step_size=0",
             "--set", f"run.out_dir={tmp_path / 'out'}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port, TORCHELASTIC_RUN_ID="bad-config-test"),
        )
        for rank in (0, 1)
    ]
    start = time.perf_counter()
    try:
        results = [(p.communicate(timeout=60), p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for (_, stderr), code in results:
        text = " ".join(stderr.split())
        assert code == 2, stderr[-2000:]
        assert text.count("config error:") == 1 and "optim.feedback.step_size = 0" in text
        assert "Traceback" not in text
    assert time.perf_counter() - start < 20
    assert not (tmp_path / "out").exists()


def test_stale_world_size_without_torchrun_names_the_variable(tmp_path):
    """Pinpoints a WORLD_SIZE left in the environment (no torchrun: no MASTER_ADDR/MASTER_PORT) that
    fails with torch's rendezvous text (or hangs) instead of naming WORLD_SIZE and the fix."""
    proc, seconds = _cli("train", "--set", "data.name=synthetic", "--set", "data.synthetic_shape=[1, 8, 8]",
                         "--set", "data.synthetic_size=64", "--set", "data.batch_size=16",
                         "--set", "run.max_steps=1", "--set", "run.progress=false",
                         "--set", f"run.out_dir={tmp_path / 'out'}", WORLD_SIZE="2", RANK="0")
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "WORLD_SIZE" in text and "torchrun" in text and "Traceback" not in text
    assert seconds < 20
