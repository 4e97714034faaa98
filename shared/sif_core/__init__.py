"""Contracts shared by the functions, the GPU worker and the local stack: settings, AWS clients,
the S3 model source, tenants and the work (batch/job) records."""
