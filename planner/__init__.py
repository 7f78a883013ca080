"""The SLO planner: engine profiles, a discrete-event simulator of the cluster, and a
search over layouts.

    profile  = Profile.load("profile.json")          # planner.profile (measured by measure)
    workload = Workload.from_mix(Mix.named("prompt-heavy"))
    result   = simulate(layout, profile, workload.at_rate(0.4, n=400, seed=1))
    best     = search(profile, workload, slo, budget_devices=4)   # planner.search

The planner knows nothing of Ray, Redis or the cluster config: `pdserve plan` (in
`cluster/`) turns a chosen `Layout` into a cluster config.
"""
