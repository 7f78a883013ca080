"""Tensor and pipeline parallelism for the engine, applied from outside the model.

`layout` says which heads, layers and vocabulary rows a rank owns; `comm` builds the
rank's torch.distributed groups over a TCPStore (gloo for CPU tensors, nccl for CUDA);
`shard` cuts a loaded model down to one rank's share and wires its collectives;
`step_io` carries a step's inputs from the driving rank to the others as plain
tensors; `worker` is the loop a non-driving rank runs.
"""
