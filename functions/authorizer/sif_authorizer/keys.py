"""API keys: where a request carries one, and what the tenants table says about it (with a short-lived cache).

API Gateway can cache an authorizer's result only when every identity source is present, and a
key may come in either of two headers, so the template turns that cache off. This process keeps
its own instead: key hash -> the key's check (its tenant) for CACHE_TTL_S, so a warm authorizer
answers without DynamoDB. That is also how long a revoked key, or a disabled or deleted tenant,
may still get past this instance: every entry is read again (key item and profile, strongly
consistent) once it is CACHE_TTL_S old. Metering does not wait for it: the usage transaction
checks the key and the profile itself, so nothing is billed meanwhile (sif_metering.ledger).
Only allowed keys are cached: a key created, or a tenant enabled, a moment ago works at once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sif_core.tenants import KeyCheck, Tenant, api_key_from_headers, hash_key

__all__ = ["CACHE_SIZE", "CACHE_TTL_S", "TenantCache", "api_key_from_headers"]

CACHE_TTL_S = 10.0  # the documented bound (README, "Keys") on a revocation reaching every authorizer
CACHE_SIZE = 10_000


class TenantCache:
    def __init__(
        self,
        lookup: Callable[[str], KeyCheck],
        *,
        ttl_s: float = CACHE_TTL_S,
        size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lookup = lookup  # api key -> its check (the tenants table: key item, then profile)
        self.ttl_s = ttl_s
        self.size = size
        self.clock = clock
        self._items: OrderedDict[str, tuple[KeyCheck, float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, api_key: str) -> KeyCheck:
        digest = hash_key(api_key)
        now = self.clock()
        with self._lock:
            hit = self._items.get(digest)
            if hit is not None and hit[1] > now:
                self._items.move_to_end(digest)
                return hit[0]
            self._items.pop(digest, None)  # expired: read again, and forgotten if now refused
        check = self.lookup(api_key)
        if check.allowed:
            with self._lock:
                self._items[digest] = (check, now + self.ttl_s)
                self._items.move_to_end(digest)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return check

    def tenant(self, api_key: str) -> Tenant | None:
        """The key's tenant while it may call, else None."""
        check = self.check(api_key)
        return check.tenant if check.allowed else None

    def clear(self) -> None:
        """Forget every entry (what CACHE_TTL_S does to each on its own)."""
        with self._lock:
            self._items.clear()
