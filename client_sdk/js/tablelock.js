// @ts-check
/**
 * tablelock browser SDK: ES modules, no build step, no dependencies. This is the entry: import
 * from `/sdk/tablelock.js`; the modules beside it each do one job (see README.md).
 *
 * Speaks protocol v1 of the tablelock broker (`PROTOCOL.md`) over a WebSocket
 * with subprotocol `tablelock.v1`:
 *
 * - {@link connect} opens a {@link TablelockClient}: hello, then reconnect with
 *   exponential backoff and jitter, and re-subscribe of each channel at its
 *   position, `since` and `epoch` (the last seq seen and the numbering it
 *   belongs to): one way back, on whichever broker the load balancer picks.
 * - {@link TablelockClient#subscribe} returns a {@link ChannelMirror}: the
 *   channel's state (orders, locks, online terminals) kept current from the
 *   snapshot and the events, re-snapshotted on a seq gap or after a reconnect.
 * - {@link TablelockClient#acquire} returns a {@link LockHandle}: its fencing
 *   token, `expiresAt`, `release()`, a `lost` promise, and auto-renewal for
 *   ERP roles.
 * - {@link TablelockClient#pay} is the H5 page's helper: payment lock on the
 *   fresh order, a countdown on the server's clock, the `charge` to hand the
 *   payment provider and `confirmed` (the broker's `order.paid`), release on
 *   `pagehide`, and `ERP_UNAVAILABLE` ("pay at the front desk") as the fallback.
 *   A phone never records a payment itself: its `payment.complete` is refused
 *   here, before it is sent; the platform's payment service records it.
 * - A write answered `UNAVAILABLE` with `"outcome": "unknown"` is settled by
 *   reading the order (`order.get`) before anything is reported.
 * - Refusals are {@link TablelockError}s (one subclass per error code) whose
 *   `message` is the broker's prompt in the session's locale.
 *
 * Wire objects (orders, locks, terminals, event frames) are handed out as the
 * broker sends them, in snake_case; the SDK's own API is camelCase.
 *
 * @module tablelock
 */

export { VERSION, PROTOCOL_VERSION, SUBPROTOCOL, TablelockConnection } from "./connection.js";
export { TablelockClient, connect } from "./client.js";
export { ChannelMirror } from "./mirror.js";
export { LockHandle } from "./lock.js";
export { PaymentSession } from "./payment.js";
export { lockKey, parseChannel, capability } from "./helpers.js";
export {
  ErrorCode,
  ERROR_CLASSES,
  prompt,
  TablelockError,
  OrderLockedError,
  PaymentLockedError,
  PresettleLockedError,
  AcceptBlockedError,
  ErpUnavailableError,
  LockExpiredError,
  StaleVersionError,
  OrderPaidError,
  AmountMismatchError,
  FencedError,
  NotHolderError,
  ForbiddenError,
  AuthFailedError,
  BadRequestError,
  UnsupportedProtocolError,
  RateLimitedError,
  NotFoundError,
  LimitReachedError,
  UnavailableError,
  DisconnectedError,
  RequestTimeoutError,
} from "./errors.js";
export {
  ROLES,
  CAPABILITIES,
  FIRST_AUTHORITY,
  CLOSE,
  CLOSE_CODES,
  ERROR_CODES,
  LOST_LOCK_REASONS,
  CONFIG_DEFAULTS,
  PROMPTS,
} from "./constants.js";

import { connect, TablelockClient } from "./client.js";
import { ErrorCode, prompt, TablelockError } from "./errors.js";

export default { connect, TablelockClient, TablelockError, ErrorCode, prompt };
