"""The Kubernetes renderer: the cluster config as KubeRay manifests.

`settings` is the config's `kubernetes:` section; `render` checks a config and turns it
into files, from `groups` (Ray node groups and their pod sizes), `serve_config` (the
pod config and serveConfigV2), `pods`, `rayservice`, `redis` and `services`.
"""
