#!/usr/bin/env bash
# Test accuracy of all seven rules on real Fashion-MNIST with conv2 (paper Table 1 set-up,
# fewer epochs). Usage: benchmarks/fmnist_rules.sh [EPOCHS] [OUT]   (defaults: 3, runs/fmnist_rules)
set -euo pipefail
epochs=${1:-3}
out=${2:-runs/fmnist_rules}
for rule in bp bp_fc_only fa kp dfa dkp drtp; do
  parallel-dkp train --config configs/fashion_mnist_conv2.toml --set rule.name="$rule" \
    --set run.epochs="$epochs" --set run.out_dir="$out/{rule}" --set run.progress=false
done
python - "$out" <<'PY'
import json, sys, pathlib
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    print(f"{last['rule']:12s} epochs={last['epoch']} test_acc={last['test_acc']:.4f} train_acc={last['train_acc']:.4f} "
          f"train_s/epoch={sum(r['train_seconds'] for r in rows) / len(rows):.1f}")
PY
