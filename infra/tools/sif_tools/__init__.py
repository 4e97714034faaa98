"""Tools that read template.yaml: `template` (the reader: parameters, intrinsics, functions, layers,
API routes, event sources; shared by the local stack's emulator), `package` (`make package`: Lambda
layers, function folders and zips, as the template declares them) and `pip_progress` (pip's output
as one status line for the Makefile)."""
