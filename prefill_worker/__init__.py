"""The prefill role: the prefill pool's Ray Serve deployment.

A replica batches prompts under a token budget and pushes each prompt's KV blocks,
layer by layer, through a kv_transfer sender into the blocks a decode instance has
preallocated. What it shares with the decode role lives in `worker`.
"""
