"""The local stack: template.yaml's resources in moto's server, the functions run in-process.

Modules: `template` (reads template.yaml, resolves intrinsics, lists functions / routes / queue
subscriptions), `awsemu` (moto's server on 127.0.0.1), `stack` (creates the resources, publishes the
models, writes .local/stack.json, runs `sif up`), `cli` (the `sif` command).
"""
