"""The local stack's AWS emulator: template.yaml's resources in moto's server, the functions run in-process.

template.yaml is read by `sif_tools.template` (parameters, intrinsics, functions, API routes, event
sources), which the Lambda packager shares.

What AWS does, each in one module:

- `resources`    creates each resource type in moto, one translator per AWS service (`resources/`)
- `moto_server`  moto's server on 127.0.0.1 (port checks, client environment)
- `moto_patches` every change made to moto's behaviour, each with why (one module)
- `presigned`    query-string SigV4 verification for presigned URLs, as S3 does it
- `state`        snapshots of the emulator's state, so a restart keeps tenants, files and usage
- `lambda_runtime` Lambda's runtime: a process per function, its context, timeouts and memory
- `gateway`      API Gateway (REST): routes, the Lambda authorizer, proxy events
- `pollers`      event source mappings: S3 notifications via SQS, SQS -> function
- `batch`        AWS Batch: the GPU queue's jobs run as local processes
- `stack`        creates the stack from the template, starts the services, writes .local/stack.json
- `background`   `sif up --background` / `sif down`

Nothing here is product code: the functions, layers and shared core never import it.
"""
