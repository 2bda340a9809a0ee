"""tablelock_client: the Python SDK of the tablelock order-lock broker.

    client = await tablelock_client.connect(url, token)
    async with client.lock(order_id, "payment") as lock:
        ...  # lock.token fences every write; lock.lost fires if it is taken away

`tablelock_client.sync.connect` is the same for programs that are not asyncio.
`PaymentService` records a phone's payment over HTTP, as the platform's payment service.
"""

from .client import Client, FetchHandler, connect
from .connection import VERSION as __version__
from .errors import (
    ERRORS,
    AcceptBlocked,
    AmountMismatch,
    AuthFailed,
    BadRequest,
    Disconnected,
    ErpUnavailable,
    Fenced,
    Forbidden,
    LimitReached,
    LockExpired,
    NotFound,
    NotHolder,
    OrderLocked,
    OrderPaid,
    OutcomeUnknown,
    PaymentLocked,
    PresettleLocked,
    RateLimited,
    StaleVersion,
    TablelockError,
    Unavailable,
    UnsupportedProtocol,
    error_from,
)
from .locks import LockHandle
from .mirror import Change, ChangeStream, Mirror, OrderMirror, StoreMirror
from .model import (
    CheckResult,
    Contention,
    Holder,
    Lock,
    Order,
    OrderView,
    Payment,
    PaymentResult,
    StoreConfig,
    Terminal,
)
from .service import PaymentService

__all__ = [
    "ERRORS",
    "AcceptBlocked",
    "AmountMismatch",
    "AuthFailed",
    "BadRequest",
    "Change",
    "ChangeStream",
    "CheckResult",
    "Client",
    "Contention",
    "Disconnected",
    "ErpUnavailable",
    "Fenced",
    "FetchHandler",
    "Forbidden",
    "Holder",
    "LimitReached",
    "Lock",
    "LockExpired",
    "LockHandle",
    "Mirror",
    "NotFound",
    "NotHolder",
    "Order",
    "OrderLocked",
    "OrderMirror",
    "OrderPaid",
    "OrderView",
    "OutcomeUnknown",
    "Payment",
    "PaymentLocked",
    "PaymentResult",
    "PaymentService",
    "PresettleLocked",
    "RateLimited",
    "StaleVersion",
    "StoreConfig",
    "StoreMirror",
    "TablelockError",
    "Terminal",
    "Unavailable",
    "UnsupportedProtocol",
    "__version__",
    "connect",
    "error_from",
]
