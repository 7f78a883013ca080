"""The prefill pool's Ray Serve deployment.

Each replica will drive an engine (with its TP/PP rank actors), batch prompts under a
token budget, and push KV blocks through a kv_transfer sender into blocks that a
decode instance has preallocated. Nothing is implemented here yet.
"""
