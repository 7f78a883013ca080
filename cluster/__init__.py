"""Cluster configuration and control.

It will hold the typed cluster config, the builder that turns it into a Ray Serve
application with placement groups, the Redis registry, the `pdserve` CLI and the
Kubernetes renderer.
"""
