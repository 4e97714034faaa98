"""What the model publisher and catalogue refuse; the CLI prints the message, nothing else."""


class PublishError(Exception):
    """A model refused by `sif models publish`: nothing was written to the store."""


class CatalogError(Exception):
    """An alias or retire change refused (unknown version, aliased version, bad weights)."""


class ConflictError(CatalogError):
    """Another operator kept changing the same index or version while we retried."""
