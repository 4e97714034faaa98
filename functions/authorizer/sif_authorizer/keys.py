"""API keys: where a request carries one, and which tenant owns it (with a short-lived cache).

API Gateway can cache an authorizer's result only when every identity source is present, and a
key may come in either of two headers, so the template turns that cache off. This process keeps
its own instead: key hash -> tenant for `ttl_s`, so a warm authorizer answers without DynamoDB.
Unknown keys are not cached (a key created a moment ago must work at once).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from sif_core.tenants import Tenant, hash_key

CACHE_TTL_S = 60.0
CACHE_SIZE = 10_000


def api_key_from_headers(headers: Mapping[str, str]) -> str | None:
    """`Authorization: Bearer <key>` or `x-api-key: <key>` (header names in any case)."""
    lowered = {k.lower(): v for k, v in headers.items() if isinstance(v, str)}
    scheme, _, token = lowered.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = lowered.get("x-api-key", "").strip()
    return key or None


class TenantCache:
    def __init__(
        self,
        lookup: Callable[[str], Tenant | None],
        *,
        ttl_s: float = CACHE_TTL_S,
        size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lookup = lookup  # api key -> tenant (the tenants table, by the key's hash)
        self.ttl_s = ttl_s
        self.size = size
        self.clock = clock
        self._items: OrderedDict[str, tuple[Tenant, float]] = OrderedDict()
        self._lock = threading.Lock()

    def tenant(self, api_key: str) -> Tenant | None:
        digest = hash_key(api_key)
        now = self.clock()
        with self._lock:
            hit = self._items.get(digest)
            if hit is not None and hit[1] > now:
                self._items.move_to_end(digest)
                return hit[0]
        tenant = self.lookup(api_key)
        if tenant is not None:
            with self._lock:
                self._items[digest] = (tenant, now + self.ttl_s)
                self._items.move_to_end(digest)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return tenant
