"""The ingress deployment.

It will hold the gRPC servicer and the OpenAI-compatible HTTP API, request
validation, tokenization, the routing policy, conditional disaggregation, admission
and backpressure. Nothing is implemented here yet.
"""
