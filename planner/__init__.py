"""The SLO planner: engine profiles, a discrete-event simulator of the cluster, and a
search over layouts.

    profile  = Profile.load("profile.json")                  # planner.profile
    model    = profile.cluster_model()                       # step and transfer costs
    workload = Workload.from_mix(Mix.named("prompt-heavy"))  # planner.workload
    result   = simulate(layout, model, workload.at_rate(0.4, n=400, seed=1))
    ranked   = search(model, workload, Slo(6, 0.2), SearchSpace(budget_devices=4))

`simulate` is a pure function of a layout, a cost model and requests, so a controller
can ask it "what if" about the layout it runs. The planner knows nothing of Ray,
Redis or the cluster config: `pdserve plan` (cluster/plan_cli.py) turns a chosen
`Layout` into a cluster config.
"""
