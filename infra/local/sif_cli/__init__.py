"""The `sif` command: `sif up|down|env` (the local stack), tenants, models, score, batches, jobs, usage.

`main` parses the command line; each group of subcommands has its own module. It talks to the stack
through AWS calls and the HTTP API, like any client, and to the emulator only to start and stop it.
"""
