"""Networks as lists of blocks. Models know nothing of ranks or learning rules.

A network is ``nn.ModuleList([b_1, ..., b_L])``: every hidden block maps its input to
``pool(act(BN(layer(x))))`` (``vit``: a pre-norm transformer block on tokens) and the last block
is the output layer producing logits. ``vit`` and ``convdeep`` are stacks of equal blocks, so
layer-parallel stages can cost the same.
Learning rules and the layer-parallel runtime work on this list from outside.
"""

from parallel_dkp.models.blocks import BlockSpec, block_output_shapes, build_blocks, module_device, num_blocks, seed_for

__all__ = ["BlockSpec", "build_blocks", "block_output_shapes", "module_device", "num_blocks", "seed_for"]
