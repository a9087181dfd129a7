#!/bin/bash
# When do conv2's convolutions start to learn under dfa/dkp, and what governs it (feedback learning
# rate, batch size, init scale)? Alignment angles every 20 steps, 2 epochs of the first 20 000 Fashion-MNIST
# images, one seed. About 13 minutes on 2 CPU cores. Results and discussion: docs/results/README.md.
#   bash benchmarks/conv_learning.sh && parallel-dkp report runs/conv_learn/* --label-by dir --out docs/results/conv_learning
set -u
common="--config configs/fashion_mnist_conv2.toml --set run.epochs=2 --set data.train_limit=20000 --set analysis.align_every=20 --set run.progress=false"
export OMP_NUM_THREADS=1
parallel-dkp train $common --set rule.name=dfa --set run.out_dir=runs/conv_learn/dfa
parallel-dkp train $common --set rule.name=dkp --set run.out_dir=runs/conv_learn/dkp_blr1e-4
parallel-dkp train $common --set rule.name=dkp --set optim.feedback.lr=1e-2 --set run.out_dir=runs/conv_learn/dkp_blr1e-2
parallel-dkp train $common --set rule.name=dkp --set data.batch_size=50 --set run.out_dir=runs/conv_learn/dkp_b50
parallel-dkp train $common --set rule.name=dfa --set data.batch_size=50 --set run.out_dir=runs/conv_learn/dfa_b50
parallel-dkp train $common --set rule.name=bp_fc_only --set run.out_dir=runs/conv_learn/bp_fc_only
# init scale: B like the forward layer's default init (2.45x smaller than Kaiming's)
parallel-dkp train $common --set rule.name=dfa --set rule.feedback_init=like_weight --set run.out_dir=runs/conv_learn/dfa_like_weight
parallel-dkp train $common --set rule.name=dkp --set rule.feedback_init=like_weight --set run.out_dir=runs/conv_learn/dkp_like_weight
