"""Layer-parallel runtime: process groups, partition, stages and the pipelined training step."""
