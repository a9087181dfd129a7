"""Python steps of ``benchmarks/gpu_check.sh`` (read that script's header first).

    python benchmarks/gpu_check.py device  --out DIR
    python benchmarks/gpu_check.py compare --out DIR --device cuda|cpu [--steps 3]
    python benchmarks/gpu_check.py memory  --out DIR --device cuda|cpu --name NAME --config FILE \
        [--set k=v ...] [--steps 3]

``device`` writes ``DIR/device.json`` (card, driver, torch, CUDA, cuDNN) and prints the same.
``compare`` trains every rule a few steps on ``--device`` and on the CPU from the same seeds and
writes ``DIR/compare.json`` with, per rule, the largest absolute difference of the final
parameters, buffers and feedback (``job.stage.global_state_dict()``); it fails when a rule is
outside rtol 1e-3 / atol 1e-4. On CUDA the pass/fail run has TF32 off (float32 as on the CPU);
the differences with this torch's default TF32 settings are reported beside it, for information.
``memory`` writes ``DIR/memory_NAME.json``: ``torch.cuda.max_memory_allocated`` after a few
training steps of every rule (``"n/a"`` on the CPU, where the same steps still run).

Uses only the package's public API (``load_config``, ``build_job``, ``train_step``, ``evaluate``,
``DistContext``), single process.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from parallel_dkp.config import Config, load_config
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.train import build_job, evaluate, train_step

RULES = ("bp", "bp_fc_only", "fa", "kp", "dfa", "dkp", "drtp")
RTOL, ATOL = 1e-3, 1e-4
MIB = 2**20


# ---------------------------------------------------------------------------------------- helpers


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")


def _context(device: str) -> DistContext:
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch.cuda.is_available() is false here")
        return DistContext(device=torch.device("cuda", 0))
    return DistContext()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _batches(job, n: int):
    """``n`` training batches, going round the loader as often as needed."""
    done = 0
    while done < n:
        got = False
        for x, y in job.train_loader:
            got = True
            yield x, y
            done += 1
            if done == n:
                return
        if not got:
            raise ValueError("the training loader yields no batch; raise data.synthetic_size or lower the batch")


@contextlib.contextmanager
def _tf32(enabled: bool | None):
    """TF32 for cuDNN convolutions and CUDA matmuls on (True), off (False) or as is (None)."""
    if enabled is None or not torch.cuda.is_available():
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9: one API, never mixed
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:
        saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = enabled
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def _tf32_state() -> dict:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return {"cudnn_conv": conv.fp32_precision, "cuda_matmul": torch.backends.cuda.matmul.fp32_precision}
    return {"cudnn_conv": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee",
            "cuda_matmul": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"}


# ----------------------------------------------------------------------------------------- device


def _nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {"present": False}
    out: dict = {"present": True}
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        out["query"] = [line.strip() for line in query.stdout.splitlines() if line.strip()]
        full = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        out["text"] = full.stdout + full.stderr
        if out["query"]:
            out["driver_version"] = out["query"][0].split(",")[1].strip()
    except (OSError, subprocess.SubprocessError) as err:
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def _nccl_version() -> str:
    try:
        version = torch.cuda.nccl.version()
    except Exception as err:  # noqa: BLE001 - informational only
        return f"unknown ({type(err).__name__})"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def cmd_device(args) -> int:
    info: dict = {
        "node": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(), "dry_run": bool(args.dry_run),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({
            "device_count": torch.cuda.device_count(), "device_name": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)), "total_memory_mib": props.total_memory // MIB,
            "cudnn": torch.backends.cudnn.version(), "nccl": _nccl_version(),
            "tf32_defaults": _tf32_state(),
        })
    else:
        info["device_name"] = "cpu"
    smi = _nvidia_smi()
    info["nvidia_smi"] = {k: v for k, v in smi.items() if k != "text"}
    for key, value in info.items():
        print(f"{key}: {value}")
    print(smi.get("text", "nvidia-smi: not present"))
    _write_json(Path(args.out) / "device.json", info)
    return 0


# ---------------------------------------------------------------------------------------- compare


def _compare_config(rule: str, device: str) -> Config:
    """The multi-rank tests' small job (tests/workers.py), a little larger: conv2 on 16x16 inputs."""
    return load_config(None, [
        f"rule.name={rule}", "model.name=conv2", "data.name=synthetic", "data.synthetic_shape=[1, 16, 16]",
        "data.synthetic_size=128", "data.batch_size=16", "parallel.microbatches=2", "parallel.timeout_s=60",
        "run.progress=false", "optim.feedback.lr=0.01", f"run.device={device}",
    ])


def _run(rule: str, device: str, steps: int) -> dict:
    cfg = _compare_config(rule, device)
    job = build_job(cfg, _context(device))
    for x, y in _batches(job, steps):
        train_step(job, x, y)
    loss_sum, correct, count = evaluate(job).read()
    _sync(device)
    state = {k: v.detach().to("cpu", copy=True) for k, v in job.stage.global_state_dict().items()}
    return {"state": state, "eval": [loss_sum, correct, count]}


def _differences(ref: dict, other: dict) -> dict:
    worst_key, worst, failures = None, 0.0, []
    if set(ref["state"]) != set(other["state"]):
        return {"ok": False, "error": f"different keys: {sorted(set(ref['state']) ^ set(other['state']))}"}
    for key, a in ref["state"].items():
        b = other["state"][key]
        if a.shape != b.shape:
            failures.append(f"{key}: shape {list(a.shape)} vs {list(b.shape)}")
            continue
        if not (a.is_floating_point() or b.is_floating_point()):
            if not torch.equal(a, b):
                failures.append(f"{key}: integer buffers differ")
            continue
        diff = (a.double() - b.double()).abs()
        top = float(diff.max()) if diff.numel() else 0.0
        if top > worst or worst_key is None:
            worst, worst_key = top, key
        if not torch.allclose(b.double(), a.double(), rtol=RTOL, atol=ATOL):
            failures.append(f"{key}: max abs diff {top:.3g}")
    return {"ok": not failures, "max_abs_diff": worst, "worst_key": worst_key, "failures": failures[:10],
            "eval_loss_sum": [ref["eval"][0], other["eval"][0]], "eval_correct": [ref["eval"][1], other["eval"][1]]}


def cmd_compare(args) -> int:
    rules = [r for r in args.rules.split(",") if r]
    result: dict = {"device": args.device, "reference": "cpu", "steps": args.steps, "rtol": RTOL, "atol": ATOL,
                    "config": "conv2, synthetic [1, 16, 16], batch 16, 2 micro-batches (see gpu_check.py)",
                    "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                    "torch": torch.__version__, "rules": {}}
    if args.device == "cuda":
        result["tf32_defaults"] = _tf32_state()
    failed = []
    for rule in rules:
        start = time.perf_counter()
        try:
            ref = _run(rule, "cpu", args.steps)
            with _tf32(False if args.device == "cuda" else None):
                row = _differences(ref, _run(rule, args.device, args.steps))
            if args.device == "cuda":  # informational: this torch's default TF32 settings
                info = _differences(ref, _run(rule, args.device, args.steps))
                row["default_tf32"] = {k: info.get(k) for k in ("ok", "max_abs_diff", "worst_key")}
        except Exception as err:  # noqa: BLE001 - one rule's crash must not hide the others
            row = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        row["seconds"] = round(time.perf_counter() - start, 2)
        result["rules"][rule] = row
        print(f"{rule:>11}: {'ok  ' if row['ok'] else 'FAIL'} max abs diff {row.get('max_abs_diff', 'n/a')} "
              f"({row.get('worst_key')}) {row.get('error', '')} {row.get('failures', '')}")
        if not row["ok"]:
            failed.append(rule)
    result["ok"] = not failed
    result["failed_rules"] = failed
    _write_json(Path(args.out) / "compare.json", result)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------- memory


def cmd_memory(args) -> int:
    rules = [r for r in args.rules.split(",") if r]
    cuda = args.device == "cuda"
    ctx = _context(args.device)
    result: dict = {"name": args.name, "config": args.config, "overrides": args.overrides, "steps": args.steps,
                    "device": args.device, "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "torch": torch.__version__, "unit": "MiB", "rules": {}}
    failed = []
    for rule in rules:
        start = time.perf_counter()
        try:
            cfg = load_config(args.config, [*args.overrides, f"rule.name={rule}", f"run.device={args.device}",
                                            "run.progress=false"])
            result.update(model=cfg.model.name, data=cfg.data.name, batch_size=cfg.data.batch_size,
                          microbatches=cfg.parallel.microbatches)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            job = build_job(cfg, ctx)
            _sync(args.device)
            after_build = torch.cuda.memory_allocated() if cuda else None
            for x, y in _batches(job, args.steps):
                train_step(job, x, y)
            _sync(args.device)
            if cuda:
                row = {"peak_allocated_mib": round((torch.cuda.max_memory_allocated() - before) / MIB, 1),
                       "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / MIB, 1),
                       "after_build_mib": round((after_build - before) / MIB, 1)}
            else:
                row = {"peak_allocated_mib": "n/a", "peak_reserved_mib": "n/a", "after_build_mib": "n/a"}
            row["ok"] = True
            del job
        except Exception as err:  # noqa: BLE001 - one rule's crash must not hide the others
            row = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            failed.append(rule)
        row["seconds"] = round(time.perf_counter() - start, 2)
        result["rules"][rule] = row
        print(f"{rule:>11}: {row}")
    result["ok"] = not failed
    _write_json(Path(args.out) / f"memory_{args.name}.json", result)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    device = sub.add_parser("device", help="card, driver, torch and CUDA versions to DIR/device.json")
    device.add_argument("--out", required=True)
    device.add_argument("--dry-run", action="store_true", help="only recorded in the JSON")
    compare = sub.add_parser("compare", help="every rule on --device against the CPU, to DIR/compare.json")
    compare.add_argument("--out", required=True)
    compare.add_argument("--device", choices=("cuda", "cpu"), required=True)
    compare.add_argument("--steps", type=int, default=3)
    compare.add_argument("--rules", default=",".join(RULES))
    memory = sub.add_parser("memory", help="peak CUDA memory per rule, to DIR/memory_NAME.json")
    memory.add_argument("--out", required=True)
    memory.add_argument("--device", choices=("cuda", "cpu"), required=True)
    memory.add_argument("--name", required=True, help="names the output file memory_NAME.json")
    memory.add_argument("--config", help="TOML file, as for parallel-dkp")
    memory.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    memory.add_argument("--steps", type=int, default=3)
    memory.add_argument("--rules", default=",".join(RULES))
    args = parser.parse_args(argv)
    return {"device": cmd_device, "compare": cmd_compare, "memory": cmd_memory}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
