"""The chaos run's fixed settings: the secret its tokens share with the brokers, the stores'
config, and the bounds its checks judge by."""

from __future__ import annotations

from typing import Any

SECRET = "chaos-run-secret-0123456789abcdef0123"
H5_TTL_MS = 5_000
STORE_CONFIG = {"h5_payment_lock_ttl_ms": H5_TTL_MS, "erp_lock_ttl_ms": 10_000,
                "disconnect_grace_ms": 5_000, "erp_fetch_timeout_ms": 2_000}
MEMORY_GROWTH_LIMIT = 0.25
# The harness's clock against the server's, for (f): a lock lives at least its shortest
# TTL or grace after its request left, less this.
CLOCK_SLACK_S = 0.5
# (f) gives up on an order after this many configurations of its search (then it fails):
# about a minute of search, for a history with a dozen unanswered requests on one order.
LINEARIZABILITY_BUDGET = 500_000
# (f): an unanswered request takes effect within this of being sent, or never. The broker
# resolves a lost commit within 5 s of sending it (an ERP pull and Redis timeouts come
# before): 20 s leaves a busy machine's event-loop lag room.
EFFECT_WITHIN_S = 20.0
# A Redis pause outlasts the brokers' Redis socket timeout (0.4 s): the commit in flight
# times out and is resolved by its commit id once Redis runs again.
PAUSE_S = 0.6
Frame = dict[str, Any]
