// @ts-check
/**
 * tablelock browser SDK: one ES module, no build step, no dependencies.
 *
 * Speaks protocol v1 of the tablelock broker (`PROTOCOL.md`) over a WebSocket
 * with subprotocol `tablelock.v1`:
 *
 * - {@link connect} opens a {@link TablelockClient}: hello, then reconnect with
 *   exponential backoff and jitter, `resume` of the session, and re-subscribe
 *   with `since` (the last seq seen on each channel).
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

export const VERSION = "0.1.0";
export const PROTOCOL_VERSION = 1;
export const SUBPROTOCOL = "tablelock.v1";

// --- wire types -------------------------------------------------------------------------

/** @typedef {"order"|"payment"|"presettle"} LockKind */
/** @typedef {"erp_main"|"erp_secondary"|"h5"|"manager"|"service"} Role */
/** @typedef {"edit"|"add_items"|"modify"|"pay"|"presettle"|"accept"} Action */
/** @typedef {"add_items"|"modify"|"status"} Change */
/** @typedef {"zh-CN"|"en"} Locale */
/**
 * @typedef {object} Order
 * @property {string} order_id
 * @property {string} table_id
 * @property {number} version only grows; assigned by the ERP
 * @property {number} amount_cents
 * @property {any[]} [items]
 * @property {"open"|"paid"|"closed"} [status]
 */
/** @typedef {{terminal_id: string, role: Role, name: string}} Holder */
/**
 * @typedef {object} Lock
 * @property {string} store_id
 * @property {string} order_id
 * @property {LockKind} kind
 * @property {number} token fencing token
 * @property {Holder} holder
 * @property {number} acquired_at ms since the epoch (server clock)
 * @property {number} expires_at ms since the epoch (server clock)
 * @property {number} order_version
 */
/**
 * @typedef {object} Terminal
 * @property {string} terminal_id
 * @property {Role} role
 * @property {string} name
 * @property {string} store_id
 * @property {string|null} [table_id]
 */
/**
 * @typedef {object} StoreConfig
 * @property {boolean} strong_link
 * @property {number} h5_payment_lock_ttl_ms
 * @property {number} erp_lock_ttl_ms
 * @property {number} disconnect_grace_ms
 * @property {number} erp_fetch_timeout_ms
 * @property {Locale} locale
 * @property {number} order_retention_ms
 */
/** @typedef {{token: number|null, amount_cents: number, payment_ref: string, by: Terminal|null}} PaymentRecord */
/**
 * An event frame as the broker pushes it (PROTOCOL.md sections 4 and 6).
 * @typedef {object} EventFrame
 * @property {"event"} type
 * @property {string} event `lock.acquired`, `lock.released`, `lock.expired`, `lock.forced`,
 *   `lock.contended`, `order.updated`, `order.paid`, `terminal.online`, `terminal.offline`,
 *   `config.updated`
 * @property {number} ts
 * @property {string} [channel] absent on direct events
 * @property {number} [seq] absent on direct events
 * @property {boolean} [direct]
 * @property {Lock} [lock]
 * @property {string} [reason] `released|upgraded|paid|holder_disconnected` on `lock.released`
 * @property {Terminal} [by]
 * @property {string} [action]
 * @property {Order} [order]
 * @property {PaymentRecord} [payment]
 * @property {Terminal} [terminal]
 * @property {StoreConfig} [config]
 */
/**
 * @typedef {object} HelloResult
 * @property {string} session_id
 * @property {boolean} resumed
 * @property {Terminal} terminal
 * @property {{store_id: string, config: StoreConfig}} store
 * @property {number} heartbeat_ms
 * @property {number} server_time
 */
/**
 * @typedef {object} CheckResult
 * @property {boolean} allowed
 * @property {string|null} code
 * @property {string|null} message the prompt to show, in the session's locale
 * @property {boolean} canForce
 * @property {Lock|null} lock the blocking lock
 * @property {TablelockError|null} error the same refusal as an error object
 */

// --- errors -----------------------------------------------------------------------------

/** Every error code: section 7 of PROTOCOL.md, plus the SDK's own `DISCONNECTED` and `TIMEOUT`. */
export const ErrorCode = Object.freeze({
  ORDER_LOCKED: "ORDER_LOCKED",
  PAYMENT_LOCKED: "PAYMENT_LOCKED",
  PRESETTLE_LOCKED: "PRESETTLE_LOCKED",
  ACCEPT_BLOCKED: "ACCEPT_BLOCKED",
  ERP_UNAVAILABLE: "ERP_UNAVAILABLE",
  LOCK_EXPIRED: "LOCK_EXPIRED",
  STALE_VERSION: "STALE_VERSION",
  ORDER_PAID: "ORDER_PAID",
  AMOUNT_MISMATCH: "AMOUNT_MISMATCH",
  FENCED: "FENCED",
  NOT_HOLDER: "NOT_HOLDER",
  FORBIDDEN: "FORBIDDEN",
  AUTH_FAILED: "AUTH_FAILED",
  BAD_REQUEST: "BAD_REQUEST",
  UNSUPPORTED_PROTOCOL: "UNSUPPORTED_PROTOCOL",
  RATE_LIMITED: "RATE_LIMITED",
  NOT_FOUND: "NOT_FOUND",
  UNAVAILABLE: "UNAVAILABLE",
  /** This broker's own: a connection or subscription limit is reached. */
  LIMIT_REACHED: "LIMIT_REACHED",
  /** SDK only: the socket is down (or closed while the request was in flight). */
  DISCONNECTED: "DISCONNECTED",
  /** SDK only: no reply in time. */
  TIMEOUT: "TIMEOUT",
});

/** Codes that mean "the broker could not answer": the screen must not guess a lock state. */
const UNREACHABLE = new Set(["UNAVAILABLE", "DISCONNECTED", "TIMEOUT"]);

/**
 * The prompts of PROTOCOL.md section 7, for messages the SDK must make up itself
 * (the broker is unreachable) and for pages that want them: [zh-CN, en].
 * @type {Record<string, [string, string]>}
 */
const PROMPTS = {
  ORDER_LOCKED: ["商家正在修改订单，请稍后再结账",
    "The order is being changed at the counter. Please pay when it is done."],
  PAYMENT_LOCKED: ["此订单正在其他机器/顾客端进行结账，现在结账可能导致重复支付，是否确定继续结账？",
    "This order is being checked out on another machine or by the customer. " +
    "Checking out now may cause a duplicate payment. Continue?"],
  "PAYMENT_LOCKED/h5": ["订单正在其他机器/顾客端进行支付，请稍后再试",
    "This order is being paid elsewhere. Please try again shortly."],
  PRESETTLE_LOCKED: ["订单已预结，暂不能修改",
    "The bill has been printed; the order cannot be changed now."],
  ACCEPT_BLOCKED: ["订单正在其他机器/顾客端进行支付，暂不能接单，如需接单请先取消支付",
    "This order is being paid on another machine or by the customer, " +
    "so it cannot be accepted now. Cancel the payment first."],
  "ACCEPT_BLOCKED/presettle": ["订单已预结，暂不能接单，如需接单请先取消预结",
    "The bill has been printed, so the order cannot be accepted now. Cancel the pre-bill first."],
  ERP_UNAVAILABLE: ["获取订单失败，请到前台结账",
    "Could not get the latest order. Please pay at the front desk."],
  LOCK_EXPIRED: ["支付超时，请重新获取订单后再支付",
    "The payment timed out. Please reload the order and pay again."],
  STALE_VERSION: ["订单已变更，请刷新后再支付",
    "The order has changed. Please refresh it before paying."],
  ORDER_PAID: ["订单已支付", "This order has already been paid."],
  AMOUNT_MISMATCH: ["支付金额与订单金额不一致，请刷新后再支付",
    "The amount paid differs from the order total. Please refresh before paying."],
  FENCED: ["此订单已被其他机器接管", "This order was taken over by another machine."],
  NOT_HOLDER: ["您未持有该锁", "You do not hold this lock."],
  FORBIDDEN: ["无权执行此操作", "This terminal may not do that."],
  "FORBIDDEN/h5_payment": ["顾客手机不能记录支付：请通过支付服务商付款，由支付服务确认",
    "A phone does not record payments: pay through the payment provider, whose payment " +
    "service records the payment."],
  AUTH_FAILED: ["身份验证失败，请重新登录", "Authentication failed. Please sign in again."],
  BAD_REQUEST: ["请求格式错误", "The request is malformed."],
  UNSUPPORTED_PROTOCOL: ["不支持的协议版本", "This protocol version is not supported."],
  RATE_LIMITED: ["请求过于频繁，请稍后再试", "Too many requests. Please slow down."],
  NOT_FOUND: ["未找到该订单", "No such order."],
  LIMIT_REACHED: ["连接或订阅数已达上限", "A connection or subscription limit is reached."],
  UNAVAILABLE: ["锁服务暂不可用，请稍后再试",
    "The lock service is unavailable right now. Please try again shortly."],
  DISCONNECTED: ["与锁服务的连接已断开，请稍后再试",
    "The connection to the lock service is down. Please try again shortly."],
  TIMEOUT: ["锁服务响应超时，请稍后再试",
    "The lock service did not answer in time. Please try again shortly."],
};

/**
 * The screen prompt for `code` (PROTOCOL.md section 7). `variant` picks a qualified text:
 * `"h5"` for `PAYMENT_LOCKED` on a customer's page, `"presettle"` for `ACCEPT_BLOCKED` by a
 * pre-bill, `"h5_payment"` for the `FORBIDDEN` of a phone that would record a payment. Anything but `"en"` reads zh-CN, as the broker does.
 * @param {string} code
 * @param {string} [locale]
 * @param {string} [variant]
 * @returns {string}
 */
export function prompt(code, locale = "zh-CN", variant = "") {
  const texts = (variant && PROMPTS[`${code}/${variant}`]) || PROMPTS[code];
  if (!texts) return code;
  return locale === "en" ? texts[1] : texts[0];
}

/**
 * A refusal by the broker, or the SDK's own `DISCONNECTED` / `TIMEOUT`.
 * `message` is the broker's prompt in the session's locale (show it as is).
 */
export class TablelockError extends Error {
  /**
   * @param {string} code
   * @param {string} [message]
   * @param {{canForce?: boolean, lock?: Lock|null, request?: string|null, cause?: unknown,
   *   outcome?: string|null}} [options]
   */
  constructor(code, message, options = {}) {
    super(message || code, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    /** @type {string} one of {@link ErrorCode} (or a code this SDK does not know yet) */
    this.code = code;
    /** True when an ERP/manager may repeat the request with `force: true`. */
    this.canForce = Boolean(options.canForce);
    /** @type {Lock|null} the lock that blocked the request, if one did */
    this.lock = options.lock ?? null;
    /** @type {string|null} the request type that was refused */
    this.request = options.request ?? null;
    /** @type {string|null} `"unknown"`: an `UNAVAILABLE` write that may have been applied */
    this.outcome = options.outcome ?? null;
    /** @type {{order: Order|null, locks: Lock[]}|null} the order as read after such a write */
    this.reread = null;
  }

  /** The H5 page must send the customer to the front desk (`ERP_UNAVAILABLE`). */
  get payAtFrontDesk() {
    return this.code === ErrorCode.ERP_UNAVAILABLE;
  }

  /** The broker could not be reached or could not answer: never guess a lock state. */
  get unavailable() {
    return UNREACHABLE.has(this.code);
  }

  /** @returns {Holder|null} who holds the blocking lock, if any */
  get holder() {
    return this.lock ? this.lock.holder : null;
  }

  /**
   * The error for a wire error body `{code, message, can_force, lock}`.
   * @param {{code: string, message?: string, can_force?: boolean, lock?: Lock|null,
   *   outcome?: string}} body
   * @param {string|null} [request]
   * @returns {TablelockError}
   */
  static fromWire(body, request = null) {
    return makeError(body.code, body.message, {
      canForce: body.can_force, lock: body.lock ?? null, request, outcome: body.outcome ?? null,
    });
  }
}

export class OrderLockedError extends TablelockError {}
export class PaymentLockedError extends TablelockError {}
export class PresettleLockedError extends TablelockError {}
export class AcceptBlockedError extends TablelockError {}
/** "Pay at the front desk": the broker could not get the latest order from the ERP. */
export class ErpUnavailableError extends TablelockError {}
export class LockExpiredError extends TablelockError {}
export class StaleVersionError extends TablelockError {}
export class OrderPaidError extends TablelockError {}
export class AmountMismatchError extends TablelockError {}
export class FencedError extends TablelockError {}
export class NotHolderError extends TablelockError {}
export class ForbiddenError extends TablelockError {}
export class AuthFailedError extends TablelockError {}
export class BadRequestError extends TablelockError {}
export class UnsupportedProtocolError extends TablelockError {}
export class RateLimitedError extends TablelockError {}
export class NotFoundError extends TablelockError {}
/** A connection or subscription limit of the broker is reached. */
export class LimitReachedError extends TablelockError {}
/** The broker's backend is down (`UNAVAILABLE`); also the base of the SDK's own two below. */
export class UnavailableError extends TablelockError {}
/** SDK only: the socket is down, or closed while the request was in flight (outcome unknown). */
export class DisconnectedError extends UnavailableError {}
/** SDK only: no reply within the request timeout (outcome unknown). */
export class RequestTimeoutError extends UnavailableError {}

/** The error class of each code. @type {Readonly<Record<string, typeof TablelockError>>} */
export const ERROR_CLASSES = Object.freeze({
  ORDER_LOCKED: OrderLockedError,
  PAYMENT_LOCKED: PaymentLockedError,
  PRESETTLE_LOCKED: PresettleLockedError,
  ACCEPT_BLOCKED: AcceptBlockedError,
  ERP_UNAVAILABLE: ErpUnavailableError,
  LOCK_EXPIRED: LockExpiredError,
  STALE_VERSION: StaleVersionError,
  ORDER_PAID: OrderPaidError,
  AMOUNT_MISMATCH: AmountMismatchError,
  FENCED: FencedError,
  NOT_HOLDER: NotHolderError,
  FORBIDDEN: ForbiddenError,
  AUTH_FAILED: AuthFailedError,
  BAD_REQUEST: BadRequestError,
  UNSUPPORTED_PROTOCOL: UnsupportedProtocolError,
  RATE_LIMITED: RateLimitedError,
  NOT_FOUND: NotFoundError,
  LIMIT_REACHED: LimitReachedError,
  UNAVAILABLE: UnavailableError,
  DISCONNECTED: DisconnectedError,
  TIMEOUT: RequestTimeoutError,
});

/**
 * @param {string} code
 * @param {string|undefined} message
 * @param {{canForce?: boolean, lock?: Lock|null, request?: string|null, cause?: unknown,
 *   outcome?: string|null}} [options]
 * @returns {TablelockError}
 */
function makeError(code, message, options) {
  const Cls = ERROR_CLASSES[code] ?? TablelockError;
  return new Cls(code, message, options);
}

// --- small helpers ----------------------------------------------------------------------

const noop = () => {};

/** A write the broker may or may not have applied: read the order before saying anything. */
function outcomeUnknown(/** @type {unknown} */ err) {
  return err instanceof TablelockError && err.code === "UNAVAILABLE" && err.outcome === "unknown";
}

/** A monotonic "now" in epoch ms (does not jump with the wall clock). */
function localNow() {
  const perf = globalThis.performance;
  return perf && perf.timeOrigin ? perf.timeOrigin + perf.now() : Date.now();
}

/**
 * @template T
 * @returns {{promise: Promise<T>, resolve: (value: T) => void, reject: (reason: unknown) => void}}
 */
function deferred() {
  /** @type {(value: T) => void} */
  let resolve = noop;
  /** @type {(reason: unknown) => void} */
  let reject = noop;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(noop); // never an "unhandled rejection" for a promise nobody awaited
  return { promise, resolve, reject };
}

/**
 * @param {string} name
 * @param {unknown} [detail]
 */
function event(name, detail) {
  return new CustomEvent(name, { detail });
}

/** Drop `undefined` values so that optional params are simply absent on the wire. */
function compact(/** @type {Record<string, unknown>} */ params) {
  /** @type {Record<string, unknown>} */
  const out = {};
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined) out[key] = value;
  }
  return out;
}

/** @param {string} orderId @param {string} kind */
export function lockKey(orderId, kind) {
  return `${orderId}/${kind}`;
}

/**
 * `store:<store>` or `order:<store>:<order>`, parsed; throws a TypeError otherwise.
 * @param {string} channel
 * @returns {{storeId: string, orderId: string|null}}
 */
export function parseChannel(channel) {
  const colon = channel.indexOf(":");
  const kind = channel.slice(0, colon);
  const rest = channel.slice(colon + 1);
  if (colon > 0 && kind === "store" && rest && !rest.includes(":")) {
    return { storeId: rest, orderId: null };
  }
  if (colon > 0 && kind === "order") {
    const sep = rest.indexOf(":");
    if (sep > 0 && sep < rest.length - 1) {
      return { storeId: rest.slice(0, sep), orderId: rest.slice(sep + 1) };
    }
  }
  throw new TypeError(`not a tablelock channel: ${channel}`);
}

/** The claims of a JWT, read without verifying it (only to know the store before hello). */
function peekClaims(/** @type {string} */ token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(part + "===".slice((part.length + 3) % 4));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))));
  } catch {
    return null;
  }
}

// --- the client -------------------------------------------------------------------------

/**
 * @typedef {object} ReconnectOptions
 * @property {number} [minDelayMs=250] first retry delay
 * @property {number} [maxDelayMs=15000] cap of the exponential backoff
 * @property {number} [factor=2]
 * @property {number} [jitter=0.5] each delay is drawn from [d * (1 - jitter), d]
 */
/**
 * @typedef {object} ClientOptions
 * @property {string} url `ws(s)://host:port/ws`
 * @property {string | (() => string | Promise<string>)} token a JWT, or a function that returns
 *   a fresh one (called before every connection)
 * @property {Locale} [locale] language of the broker's messages (default: the store's)
 * @property {boolean} [orderAuthority] answer `order.fetch` although not `erp_main`
 *   (set automatically when `onOrderFetch` is given)
 * @property {(params: {order_id?: string, table_id?: string}) => Order | null | undefined |
 *   Promise<Order | null | undefined>} [onOrderFetch] the ERP page's answer to `order.fetch`
 * @property {ReconnectOptions} [reconnect]
 * @property {number} [requestTimeoutMs=15000]
 * @property {number} [heartbeatMs] how often to ping (default: the broker's `heartbeat_ms`)
 * @property {{name?: string, version?: string}} [clientInfo] sent in hello
 * @property {typeof WebSocket} [WebSocket] a WebSocket implementation (default: the global one)
 */

/**
 * One terminal's connection to the broker. An `EventTarget`; its events (all `CustomEvent`s):
 *
 * - `open` `{hello, resumed}`: hello succeeded (first connection or a reconnect).
 * - `close` `{code, reason, willReconnect}`: the socket went down.
 * - `stale` `{stale}`: `true` while the socket is down or a mirror that was current is
 *   re-syncing (after a reconnect or a seq gap), then `false`. Grey out lock buttons while
 *   stale: screens never guess a lock state.
 * - `event` `{event, replayed}`: every event frame (channel or direct). An event published on
 *   both the order's and the store's channel arrives once per subscribed channel.
 * - `lock.contended`, `lock.forced`, ... (the event name) `{event, replayed}`: the same, by name.
 * - `config` `{config}`: the store config changed (seen on the store channel).
 * - `rpc` `{frame}`: an `rpc` frame from the broker arrived (answered by `onOrderFetch`).
 * - `tokenerror` `{error}`: an automatic `token.refresh` failed (it is tried again).
 * - `error` `{error}`: a fatal error (`AUTH_FAILED`, `UNSUPPORTED_PROTOCOL`): no more reconnects.
 */
export class TablelockClient extends EventTarget {
  /** @param {ClientOptions} options */
  constructor(options) {
    super();
    if (!options || !options.url) throw new TypeError("tablelock: `url` is required");
    if (!options.token) throw new TypeError("tablelock: `token` is required");
    this.options = options;
    const rc = options.reconnect ?? {};
    this._backoff = {
      min: rc.minDelayMs ?? 250,
      max: rc.maxDelayMs ?? 15_000,
      factor: rc.factor ?? 2,
      jitter: rc.jitter ?? 0.5,
    };
    this._requestTimeoutMs = options.requestTimeoutMs ?? 15_000;
    /** @type {WebSocket|null} */
    this._ws = null;
    this._gen = 0; // bumped whenever a socket is abandoned: its late callbacks are ignored
    this._nextId = 1;
    /** @type {Map<number, {resolve: (v: any) => void, reject: (e: unknown) => void, timer: any, type: string}>} */
    this._pending = new Map();
    /** @type {Map<string, ChannelMirror>} */
    this._mirrors = new Map();
    /** @type {Map<string, LockHandle>} */
    this._handles = new Map();
    this._connected = false;
    this._connecting = false;
    this._closedByUser = false;
    /** @type {TablelockError|null} */
    this._fatal = null;
    this._attempt = 0;
    /** @type {any} */
    this._retryTimer = null;
    /** @type {any} */
    this._pingTimer = null;
    this._stale = true;
    /** @type {string|null} */
    this._sessionId = null;
    /** @type {HelloResult|null} */
    this._hello = null;
    /** @type {StoreConfig|null} */
    this._config = null;
    /** @type {Array<{offset: number, rtt: number}>} */
    this._clock = [];
    this._offset = 0;
    this._fetchHandler = options.onOrderFetch ?? null;
    /** @type {string|null} the token of the current (or next) connection */
    this._token = typeof options.token === "string" ? options.token : null;
    this._claims = this._token ? peekClaims(this._token) : null;
    this._everConnected = false;
    /** @type {any} */
    this._refreshTimer = null;
    /** @type {ReturnType<typeof deferred<HelloResult>>} */
    this._ready = deferred();
    /** Resolves with the first hello's result; rejects on a fatal error or `close()`. */
    this.ready = this._ready.promise;
    this._onOnline = () => {
      if (!this._connected && !this._connecting && !this._closedByUser && !this._fatal) {
        this._reconnectNow();
      }
    };
    globalThis.addEventListener?.("online", this._onOnline);
    this._open();
  }

  // --- state -------------------------------------------------------------------------------

  /** True between a successful hello and the socket going down. */
  get connected() { return this._connected; }
  /** True while the socket is down or a mirror is re-syncing (also before the first hello). */
  get stale() { return this._stale; }
  /** @returns {string|null} the broker session id (used for `resume`) */
  get sessionId() { return this._sessionId; }
  /** @returns {HelloResult|null} the last hello result */
  get hello() { return this._hello; }
  /** @returns {Terminal|null} who this client is (from the token) */
  get terminal() { return this._hello ? this._hello.terminal : null; }
  /** @returns {Role|null} */
  get role() { return this.terminal?.role ?? this._claims?.role ?? null; }
  /** @returns {string|null} */
  get storeId() { return this._hello?.store.store_id ?? this._claims?.store ?? null; }
  /** @returns {StoreConfig|null} the store config (from hello, kept current by `config.updated`) */
  get config() { return this._config; }
  /** @returns {Locale} the locale of the broker's messages */
  get locale() { return this.options.locale ?? this._config?.locale ?? "zh-CN"; }
  /** Estimated `server clock - local clock`, in ms (from hello and pings, the best RTT wins). */
  get serverOffsetMs() { return this._offset; }
  /** The broker's clock now, in ms since the epoch: compare with `expires_at`. */
  serverNow() { return Math.round(localNow() + this._offset); }
  /** @returns {ReadonlyMap<string, LockHandle>} the locks this client holds, by `orderId/kind` */
  get handles() { return this._handles; }
  /** @returns {ReadonlyMap<string, ChannelMirror>} the channels this client mirrors */
  get mirrors() { return this._mirrors; }

  // --- connection --------------------------------------------------------------------------

  async _open() {
    if (this._closedByUser || this._fatal) return;
    this._connecting = true;
    const gen = ++this._gen;
    let token;
    try {
      const source = this.options.token;
      token = typeof source === "function" ? await source() : this._token ?? source;
    } catch (err) {
      if (gen !== this._gen) return;
      this._connecting = false;
      this._scheduleReconnect();
      this.dispatchEvent(event("close", { code: 0, reason: `token: ${err}`, willReconnect: true }));
      return;
    }
    if (gen !== this._gen || this._closedByUser) return;
    this._token = token;
    this._claims = peekClaims(token) ?? this._claims;
    const Impl = this.options.WebSocket ?? globalThis.WebSocket;
    /** @type {WebSocket} */
    let ws;
    try {
      ws = new Impl(this.options.url, [SUBPROTOCOL]);
    } catch (err) {
      this._connecting = false;
      this._fail(makeError("BAD_REQUEST", `bad url: ${err}`));
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      if (gen !== this._gen) return;
      this._sayHello(ws, gen, /** @type {string} */ (token));
    };
    ws.onmessage = (msg) => this._onFrame(gen, msg.data);
    ws.onclose = (ev) => this._onClose(gen, ev.code, ev.reason);
    ws.onerror = noop; // a close always follows
  }

  /**
   * @param {WebSocket} ws
   * @param {number} gen
   * @param {string} token
   */
  _sayHello(ws, gen, token) {
    const id = this._nextId++;
    const sent = localNow();
    const info = this.options.clientInfo ?? {};
    const frame = compact({
      id,
      type: "hello",
      token,
      protocol: PROTOCOL_VERSION,
      client: { name: info.name ?? "tablelock-js", version: info.version ?? VERSION },
      locale: this.options.locale,
      resume: this._sessionId ?? undefined,
      order_authority: this.options.orderAuthority || this._fetchHandler ? true : undefined,
    });
    const timer = setTimeout(() => {
      if (gen === this._gen) this._drop(4000, "hello timed out");
    }, this._requestTimeoutMs);
    this._pending.set(id, {
      type: "hello",
      timer,
      resolve: (/** @type {HelloResult} */ hello) => {
        if (gen !== this._gen) return;
        this._clock = [];
        this._sample(sent, localNow(), hello.server_time);
        this._onHello(hello);
      },
      reject: (/** @type {unknown} */ err) => {
        if (gen !== this._gen || !(err instanceof TablelockError)) return;
        // The broker closes the socket next. A bad token is for good, unless a token function
        // may give a better one to a client that was connected before.
        if (err.code === "UNSUPPORTED_PROTOCOL" ||
            (err.code === "AUTH_FAILED" && !(this._refreshable && this._everConnected))) {
          this._fatal = err;
        }
      },
    });
    ws.send(JSON.stringify(frame));
  }

  /** @param {HelloResult} hello */
  _onHello(hello) {
    this._connecting = false;
    this._connected = true;
    this._everConnected = true;
    this._attempt = 0;
    this._hello = hello;
    this._sessionId = hello.session_id;
    this._config = hello.store.config;
    this._startHeartbeat(hello.heartbeat_ms);
    this._scheduleRefresh();
    this._ready.resolve(hello);
    this.dispatchEvent(event("open", { hello, resumed: hello.resumed }));
    // Re-subscribe every mirror with `since` (their snapshots also settle the lock handles),
    // and renew the ERP locks whose renewal fell due while the socket was down.
    for (const mirror of this._mirrors.values()) mirror._subscribe("reconnect");
    for (const handle of this._handles.values()) {
      if (handle._renewDue) handle._autoRenew();
    }
    this._updateStale();
  }

  /**
   * @param {number} gen
   * @param {number} code
   * @param {string} reason
   */
  _onClose(gen, code, reason) {
    if (gen !== this._gen) return;
    this._gen++;
    this._disconnected(code, reason);
  }

  /** Abandon the current socket now (a dead connection can take long to report its close). */
  _drop(/** @type {number} */ code, /** @type {string} */ reason) {
    const ws = this._ws;
    this._gen++;
    try {
      ws?.close(code, reason);
    } catch {
      /* already closing */
    }
    this._disconnected(code, reason);
  }

  _disconnected(/** @type {number} */ code, /** @type {string} */ reason) {
    this._ws = null;
    this._connected = false;
    this._connecting = false;
    this._stopHeartbeat();
    clearTimeout(this._refreshTimer);
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(makeError("DISCONNECTED", prompt("DISCONNECTED", this.locale),
        { request: p.type }));
    }
    for (const mirror of this._mirrors.values()) mirror._down();
    if (code === 4002) {
      this._fatal ??= makeError("UNSUPPORTED_PROTOCOL", prompt("UNSUPPORTED_PROTOCOL", this.locale));
    } else if (code === 4003 && !this._refreshable) {
      // A fixed token that was refused or has expired: only a new client (sign-in) helps.
      this._fatal ??= makeError("AUTH_FAILED", prompt("AUTH_FAILED", this.locale));
    } else if (code === 4008) {
      this._attempt = Math.max(this._attempt, 4); // policy (rate or connection limit): back off
    }
    const willReconnect = !this._closedByUser && !this._fatal;
    this._updateStale();
    this.dispatchEvent(event("close", { code, reason, willReconnect }));
    if (this._fatal && !this._closedByUser) {
      this._fail(this._fatal);
    } else if (willReconnect) {
      this._scheduleReconnect();
    }
  }

  _fail(/** @type {TablelockError} */ err) {
    this._fatal = err;
    this._ready.reject(err);
    for (const mirror of this._mirrors.values()) mirror._fail(err);
    this.dispatchEvent(event("error", { error: err }));
  }

  _scheduleReconnect() {
    clearTimeout(this._retryTimer);
    const b = this._backoff;
    const base = Math.min(b.max, b.min * b.factor ** this._attempt);
    const delay = base * (1 - b.jitter * Math.random());
    this._attempt++;
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  /** A token function can give a fresh token for every connection. */
  get _refreshable() {
    return typeof this.options.token === "function";
  }

  /** With a token function: `token.refresh` before the token's `exp`, on the live socket. */
  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    const exp = this._claims?.exp;
    if (!this._refreshable || typeof exp !== "number") return;
    const left = exp * 1000 - Date.now();
    const delay = Math.max(1000, left - Math.max(30_000, left * 0.2));
    const gen = this._gen;
    this._refreshTimer = setTimeout(() => {
      if (gen !== this._gen || !this._connected) return;
      this.refreshToken().catch((err) => {
        this.dispatchEvent(event("tokenerror", { error: err }));
        if (gen === this._gen && this._connected) {
          this._refreshTimer = setTimeout(() => this._scheduleRefresh(), 5000);
        }
      });
    }, delay);
  }

  /**
   * `token.refresh`: hand the broker a new token for this same terminal before the current one
   * ends (else the broker closes the socket with 4003 when it expires). Without an argument the
   * `token` function of the options is asked for one; a client with a token function does this
   * by itself. The new token is also used for the next reconnect.
   * @param {string} [token]
   * @returns {Promise<{expires_at: number}>}
   */
  async refreshToken(token) {
    const source = this.options.token;
    const next = token ?? (typeof source === "function" ? await source() : null);
    if (!next) throw new TypeError("tablelock: refreshToken() needs a token");
    const reply = await this.request("token.refresh", { token: next });
    this._token = next;
    this._claims = peekClaims(next) ?? this._claims;
    this._scheduleRefresh();
    return { expires_at: reply.expires_at };
  }

  _reconnectNow() {
    clearTimeout(this._retryTimer);
    this._open();
  }

  /**
   * Drop the socket and reconnect at once (e.g. after the page learns the network changed).
   * Mirrors go stale and re-sync; held locks survive within the broker's disconnect grace.
   */
  reconnect() {
    if (this._closedByUser || this._fatal) return;
    if (this._ws || this._connecting) this._drop(4000, "reconnect");
    this._attempt = 0;
    this._reconnectNow();
  }

  /**
   * Close for good: no more reconnects, pending requests fail, mirrors stop. Held locks stay
   * with the broker until released, their TTL, or the disconnect grace.
   */
  close() {
    if (this._closedByUser) return;
    this._closedByUser = true;
    clearTimeout(this._retryTimer);
    clearTimeout(this._refreshTimer);
    globalThis.removeEventListener?.("online", this._onOnline);
    for (const handle of this._handles.values()) handle._stopRenewing();
    if (this._ws || this._connecting) this._drop(1000, "client closed");
    this._ready.reject(makeError("DISCONNECTED", "the client was closed"));
    for (const mirror of this._mirrors.values()) mirror._setState("closed");
  }

  _startHeartbeat(/** @type {number} */ brokerMs) {
    this._stopHeartbeat();
    const every = this.options.heartbeatMs ?? brokerMs ?? 20_000;
    const gen = this._gen;
    const beat = () => {
      if (gen !== this._gen || !this._connected) return;
      this.ping({ timeoutMs: Math.min(every, 10_000) }).then(() => {
        if (gen === this._gen) this._pingTimer = setTimeout(beat, every);
      }, (err) => {
        // No answer in time: the connection is dead even if the socket has not noticed.
        if (gen === this._gen && err.code === "TIMEOUT") this._drop(4000, "ping timed out");
      });
    };
    this._pingTimer = setTimeout(beat, every);
  }

  _stopHeartbeat() {
    clearTimeout(this._pingTimer);
    this._pingTimer = null;
  }

  /**
   * A clock sample: the server's time was read about halfway through the round trip.
   * @param {number} sent @param {number} received @param {number} serverTime
   */
  _sample(sent, received, serverTime) {
    if (typeof serverTime !== "number") return;
    const rtt = received - sent;
    this._clock.push({ offset: serverTime - (sent + received) / 2, rtt });
    if (this._clock.length > 8) this._clock.shift();
    this._offset = this._clock.reduce((a, b) => (b.rtt < a.rtt ? b : a)).offset;
  }

  _updateStale() {
    // Stale: the socket is down, or a mirror that was current is re-syncing (after a
    // reconnect or a gap). A channel subscribed for the first time is not "stale data".
    let stale = !this._connected;
    if (!stale) {
      for (const mirror of this._mirrors.values()) {
        if (mirror._synced && (mirror.state === "syncing" || mirror.state === "idle")) {
          stale = true;
        }
      }
    }
    if (stale !== this._stale) {
      this._stale = stale;
      this.dispatchEvent(event("stale", { stale }));
    }
  }

  // --- frames ------------------------------------------------------------------------------

  /** @param {number} gen @param {unknown} data */
  _onFrame(gen, data) {
    if (gen !== this._gen) return;
    let frame;
    try {
      frame = JSON.parse(String(data));
    } catch {
      console.warn("tablelock: a frame that is not JSON", data);
      return;
    }
    if (frame.type === "event") {
      this._onEvent(frame);
    } else if (frame.type === "rpc") {
      this._onRpc(gen, frame);
    } else if ("ok" in frame) {
      const pending = this._pending.get(frame.id);
      if (!pending) {
        if (!frame.ok) console.warn("tablelock: error reply", frame.error);
        return;
      }
      this._pending.delete(frame.id);
      clearTimeout(pending.timer);
      if (frame.ok) {
        const { id: _id, ok: _ok, ...result } = frame;
        pending.resolve(result);
      } else {
        pending.reject(TablelockError.fromWire(frame.error ?? { code: "BAD_REQUEST" },
          pending.type));
      }
    }
  }

  /** @param {EventFrame} frame */
  _onEvent(frame) {
    const mirror = frame.channel ? this._mirrors.get(frame.channel) : undefined;
    if (mirror) {
      mirror._onEvent(frame); // the mirror delivers it once it is in order
    } else {
      this._deliver(frame, false);
    }
  }

  /**
   * An event in order (live, replayed from `missed`, or direct): lock handles, then listeners.
   * @param {EventFrame} frame
   * @param {boolean} replayed
   */
  _deliver(frame, replayed) {
    this._routeToHandles(frame);
    if (frame.event === "config.updated" && frame.config) {
      this._config = frame.config;
      this.dispatchEvent(event("config", { config: frame.config }));
    }
    const detail = { event: frame, replayed };
    this.dispatchEvent(event("event", detail));
    this.dispatchEvent(event(frame.event, detail));
  }

  /** @param {EventFrame} frame */
  _routeToHandles(frame) {
    const lock = frame.lock;
    if (!lock) return;
    const handle = this._handles.get(lockKey(lock.order_id, lock.kind));
    if (!handle || handle.token !== lock.token) return;
    switch (frame.event) {
      case "lock.forced":
        handle._end("forced", frame);
        break;
      case "lock.expired":
        handle._end("expired", frame);
        break;
      case "lock.released":
        handle._end(frame.reason ?? "released", frame);
        break;
      case "lock.contended":
        handle.dispatchEvent(event("contended", { event: frame, by: frame.by, action: frame.action }));
        break;
      default:
        break;
    }
  }

  /**
   * After a snapshot: a handle whose lock is not in it was lost while we were not looking.
   * @param {ChannelMirror} mirror
   */
  _verifyHandles(mirror) {
    for (const handle of [...this._handles.values()]) {
      if (!handle.held || !handle.enforced || handle.storeId !== mirror.storeId) continue;
      if (mirror.orderId !== null && handle.orderId !== mirror.orderId) continue;
      const lock = mirror.locks.get(handle.key);
      if (!lock || lock.token !== handle.token) {
        handle._end("missing", null);
      } else {
        handle._update(lock);
      }
    }
  }

  /**
   * @param {number} gen
   * @param {{rid: string, method: string, params?: Record<string, string>}} frame
   */
  async _onRpc(gen, frame) {
    this.dispatchEvent(event("rpc", { frame }));
    const ws = this._ws;
    /** @param {Record<string, unknown>} answer */
    const answer = (answer) => {
      if (gen === this._gen && ws && ws.readyState === 1) {
        ws.send(JSON.stringify({ type: "rpc.result", rid: frame.rid, ...answer }));
      }
    };
    const handler = this._fetchHandler;
    if (frame.method !== "order.fetch" || !handler) {
      answer({ ok: false, error: { code: "UNSUPPORTED", message: `no handler for ${frame.method}` } });
      return;
    }
    try {
      const order = await handler(frame.params ?? {});
      if (order) {
        answer({ ok: true, result: { order } });
      } else {
        answer({ ok: false, error: { code: "NOT_FOUND", message: "no such order" } });
      }
    } catch (err) {
      const e = /** @type {any} */ (err);
      answer({
        ok: false,
        error: { code: String(e?.code ?? "ERROR").slice(0, 100),
                 message: String(e?.message ?? e).slice(0, 500) },
      });
    }
  }

  // --- requests ----------------------------------------------------------------------------

  /**
   * Send any request and wait for its reply (the escape hatch under every method below).
   * Resolves with the reply minus `id` and `ok`; rejects with a {@link TablelockError}.
   * @param {string} type
   * @param {Record<string, unknown>} [params]
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<any>}
   */
  request(type, params = {}, options = {}) {
    if (this._fatal) return Promise.reject(this._fatal);
    const ws = this._ws;
    if (!this._connected || !ws) {
      return Promise.reject(makeError("DISCONNECTED", prompt("DISCONNECTED", this.locale),
        { request: type }));
    }
    const id = this._nextId++;
    const frame = { ...compact(params), id, type };
    return new Promise((resolve, reject) => {
      const timeoutMs = options.timeoutMs ?? this._requestTimeoutMs;
      const timer = setTimeout(() => {
        if (this._pending.delete(id)) {
          reject(makeError("TIMEOUT", prompt("TIMEOUT", this.locale), { request: type }));
        }
      }, timeoutMs);
      this._pending.set(id, { resolve, reject, timer, type });
      try {
        ws.send(JSON.stringify(frame));
      } catch (err) {
        this._pending.delete(id);
        clearTimeout(timer);
        reject(makeError("DISCONNECTED", String(err), { request: type, cause: err }));
      }
    });
  }

  /** A timeout long enough for a request that may wait on the ERP (`order.fetch`). */
  _fetchTimeout() {
    return Math.max(this._requestTimeoutMs, (this._config?.erp_fetch_timeout_ms ?? 3000) + 5000);
  }

  /**
   * `ping`: the broker's clock, and a fresh clock-offset sample.
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<{server_time: number, rtt_ms: number}>}
   */
  async ping(options = {}) {
    const sent = localNow();
    const reply = await this.request("ping", {}, options);
    const received = localNow();
    this._sample(sent, received, reply.server_time);
    return { server_time: reply.server_time, rtt_ms: received - sent };
  }

  /**
   * `check`: would `action` be allowed now? Never throws for a refusal: read `allowed`.
   * @param {string} orderId
   * @param {Action} action
   * @returns {Promise<CheckResult>}
   */
  async check(orderId, action) {
    const r = await this.request("check", { order_id: orderId, action });
    const error = r.allowed ? null : makeError(r.code, r.message,
      { canForce: r.can_force, lock: r.lock ?? null, request: "check" });
    return {
      allowed: r.allowed, code: r.code ?? null, message: r.message ?? null,
      canForce: Boolean(r.can_force), lock: r.lock ?? null, error,
    };
  }

  /**
   * `order.get`: the order and its locks, by order id or table id; `fresh` pulls it from the ERP.
   * @param {string | {orderId?: string, tableId?: string, fresh?: boolean}} target
   * @returns {Promise<{order: Order|null, locks: Lock[]}>}
   */
  getOrder(target) {
    const t = typeof target === "string" ? { orderId: target } : target;
    return this.request("order.get", {
      order_id: t.orderId, table_id: t.tableId, fresh: t.fresh || undefined,
    }, { timeoutMs: t.fresh ? this._fetchTimeout() : undefined });
  }

  /**
   * `order.publish` (ERP pages): the whole order as the ERP has it; `version` must grow.
   * @param {Order} order
   * @param {Change} [change="modify"]
   * @param {{token?: number, force?: boolean, operator?: string, reason?: string}} [options]
   * @returns {Promise<Order>} the stored order
   */
  async publishOrder(order, change = "modify", options = {}) {
    try {
      const reply = await this.request("order.publish", {
        order, change, token: options.token, force: options.force || undefined,
        operator: options.operator, reason: options.reason,
      });
      return reply.order;
    } catch (err) {
      if (!outcomeUnknown(err)) throw err;
      // The ERP assigns versions: the broker holding this version and amount holds ours.
      const { order: now } = await this._reread(order.order_id, /** @type {TablelockError} */ (err));
      if (now && now.version === order.version && now.amount_cents === order.amount_cents) return now;
      throw err;
    }
  }

  /**
   * After an `UNAVAILABLE` with `"outcome": "unknown"`: read the order as it is now, and keep
   * it on the error (`reread`). If even that fails, the original error is thrown.
   * @param {string} orderId @param {TablelockError} err
   * @returns {Promise<{order: Order|null, locks: Lock[]}>}
   */
  async _reread(orderId, err) {
    let read;
    try {
      read = await this.getOrder(orderId);
    } catch {
      throw err;
    }
    err.reread = { order: read.order ?? null, locks: read.locks ?? [] };
    return err.reread;
  }

  /**
   * `lock.acquire`: take a lock and get a {@link LockHandle}. A refusal throws the code's error
   * class (`canForce` says whether an ERP may repeat with `force: true`). Re-acquiring a lock
   * this client holds returns the same handle (renewed, for ERP locks).
   * @param {string} orderId
   * @param {LockKind} [kind="order"]
   * @param {{force?: boolean, operator?: string, reason?: string, watch?: boolean,
   *   autoRenew?: boolean}} [options] `watch` (default true) subscribes to the order's channel
   *   while the lock is held, so that every way of losing it is seen; `autoRenew` defaults to
   *   true for every role but `h5` (whose payment lock cannot be renewed)
   * @returns {Promise<LockHandle>}
   */
  async acquire(orderId, kind = "order", options = {}) {
    let reply;
    try {
      reply = await this.request("lock.acquire", {
        order_id: orderId, kind, force: options.force || undefined,
        operator: options.operator, reason: options.reason,
      }, { timeoutMs: this._fetchTimeout() });
    } catch (err) {
      if (!outcomeUnknown(err)) throw err;
      const now = await this._reread(orderId, /** @type {TablelockError} */ (err));
      const me = this.terminal;
      const mine = now.locks.find((l) => l.kind === kind && me !== null &&
        l.holder.terminal_id === me.terminal_id && l.holder.role === me.role);
      if (!mine) throw err;
      reply = { lock: mine, order: now.order };
    }
    for (const lock of reply.released ?? []) {
      const mine = this._handles.get(lockKey(lock.order_id, lock.kind));
      if (mine && mine.token === lock.token) mine._end("upgraded", null);
    }
    if (!reply.lock) {
      // strong_link off: nothing is enforced, there is no lock to hold.
      return new LockHandle(this, null, reply.order ?? null, {
        orderId, kind, storeId: this.storeId ?? "", watch: false, autoRenew: false,
      });
    }
    /** @type {Lock} */
    const lock = reply.lock;
    const key = lockKey(lock.order_id, lock.kind);
    const existing = this._handles.get(key);
    if (existing && existing.held && existing.token === lock.token) {
      existing._update(lock);
      existing._scheduleRenew();
      return existing;
    }
    if (existing && existing.held) existing._end("missing", null);
    const handle = new LockHandle(this, lock, reply.order ?? null, {
      orderId: lock.order_id, kind: lock.kind, storeId: lock.store_id,
      watch: options.watch ?? true,
      autoRenew: options.autoRenew ?? this.role !== "h5",
    });
    handle.forced = reply.forced ?? [];
    this._handles.set(key, handle);
    handle._start();
    return handle;
  }

  /**
   * `lock.renew` (ERP): push `expires_at` out by `erp_lock_ttl_ms`.
   * @param {string} orderId @param {LockKind} kind @param {number} token
   * @returns {Promise<{lock: Lock|null, enforced: boolean}>}
   */
  renew(orderId, kind, token) {
    return this.request("lock.renew", { order_id: orderId, kind, token });
  }

  /**
   * `lock.release`: with the holder's token, or (ERP/manager) `force: true` to revoke another's.
   * @param {string} orderId
   * @param {LockKind} kind
   * @param {{token?: number, force?: boolean, operator?: string, reason?: string}} [options]
   * @returns {Promise<{lock: Lock|null}>}
   */
  async release(orderId, kind, options = {}) {
    // Releasing a lock this client holds ends its handle as "released", not as a loss.
    const handle = this._handles.get(lockKey(orderId, kind));
    const ours = options.token === undefined || options.token === handle?.token;
    const mine = handle && handle.held && ours ? handle : null;
    if (mine) mine._releasing = true;
    const token = options.token ?? mine?.token ?? undefined;
    try {
      let reply;
      try {
        reply = await this.request("lock.release", {
          order_id: orderId, kind, token: options.token, force: options.force || undefined,
          operator: options.operator, reason: options.reason,
        });
      } catch (err) {
        if (!outcomeUnknown(err) || token === undefined) throw err;
        const now = await this._reread(orderId, /** @type {TablelockError} */ (err));
        if (now.locks.some((l) => l.kind === kind && l.token === token)) throw err;
        reply = { lock: null };
      }
      mine?._end("released", null);
      return reply;
    } catch (err) {
      if (mine) mine._releasing = false;
      throw err;
    }
  }

  /**
   * `payment.complete` (ERP and manager pages): record a counter payment under the payment
   * lock's token, at the order's current version and amount. Retrying with the same
   * `paymentRef` after a network error is safe (idempotent); after an `UNAVAILABLE` with
   * `"outcome": "unknown"` it reads the order and asks once more with the same ref, so the
   * answer is the truth. An `h5` client throws a `ForbiddenError` and sends nothing: a phone
   * pays through the payment provider (see {@link PaymentSession#charge}).
   * @param {{orderId: string, token?: number|null, version: number, amountCents: number,
   *   paymentRef: string}} params
   * @returns {Promise<{order: Order, payment: PaymentRecord}>}
   */
  async completePayment(params) {
    if (this.role === "h5") {
      throw makeError("FORBIDDEN", prompt("FORBIDDEN", this.locale, "h5_payment"),
        { request: "payment.complete" });
    }
    const wire = {
      order_id: params.orderId, token: params.token ?? undefined, version: params.version,
      amount_cents: params.amountCents, payment_ref: params.paymentRef,
    };
    let reply;
    try {
      reply = await this.request("payment.complete", wire);
    } catch (err) {
      if (!outcomeUnknown(err)) throw err;
      await this._reread(params.orderId, /** @type {TablelockError} */ (err));
      reply = await this.request("payment.complete", wire);
    }
    for (const handle of [...this._handles.values()]) {
      if (handle.orderId === params.orderId) handle._end("paid", null);
    }
    return reply;
  }

  /**
   * Subscribe to a channel and get its {@link ChannelMirror} once the snapshot is in.
   * Subscribing twice returns the same mirror. While the socket is down it waits for the
   * connection. Rejects with the broker's refusal (`FORBIDDEN`, `BAD_REQUEST`).
   * @param {string} channel `store:<store>` or `order:<store>:<order>`
   * @returns {Promise<ChannelMirror>}
   */
  async subscribe(channel) {
    if (this._closedByUser) throw makeError("DISCONNECTED", "the client was closed");
    const mirror = this._mirror(channel);
    mirror._userRef = true;
    await mirror.ready;
    return mirror;
  }

  /** @param {string} orderId @returns {Promise<ChannelMirror>} the order's mirror */
  async subscribeOrder(orderId) {
    if (!this.storeId) await this.ready;
    return this.subscribe(`order:${this.storeId}:${orderId}`);
  }

  /** @returns {Promise<ChannelMirror>} the store's mirror (ERP and manager terminals) */
  async subscribeStore() {
    if (!this.storeId) await this.ready;
    return this.subscribe(`store:${this.storeId}`);
  }

  /**
   * Stop mirroring a channel (kept while a held lock still watches it).
   * @param {string} channel
   */
  async unsubscribe(channel) {
    const mirror = this._mirrors.get(channel);
    if (!mirror) return;
    mirror._userRef = false;
    await this._maybeDrop(mirror);
  }

  /** @param {string} channel @returns {ChannelMirror|undefined} a mirror already kept */
  mirror(channel) {
    return this._mirrors.get(channel);
  }

  /** @param {string} channel */
  _mirror(channel) {
    let mirror = this._mirrors.get(channel);
    if (!mirror || mirror.state === "closed") {
      mirror = new ChannelMirror(this, channel);
      this._mirrors.set(channel, mirror);
      if (this._fatal) {
        mirror._fail(this._fatal);
      } else {
        mirror._subscribe("subscribe");
        this._updateStale();
      }
    }
    return mirror;
  }

  /** @param {string} channel */
  _watch(channel) {
    const mirror = this._mirror(channel);
    mirror._watchers++;
    return mirror;
  }

  /** @param {string} channel */
  _unwatch(channel) {
    const mirror = this._mirrors.get(channel);
    if (!mirror) return;
    mirror._watchers = Math.max(0, mirror._watchers - 1);
    this._maybeDrop(mirror).catch(noop);
  }

  /** @param {ChannelMirror} mirror */
  async _maybeDrop(mirror) {
    if (mirror._userRef || mirror._watchers > 0) return;
    const wasSubscribed = mirror.state === "live" || mirror.state === "syncing";
    mirror._setState("closed");
    if (this._mirrors.get(mirror.channel) === mirror) this._mirrors.delete(mirror.channel);
    this._updateStale();
    if (wasSubscribed && this._connected) {
      await this.request("unsubscribe", { channel: mirror.channel }).catch(noop);
    }
  }

  /**
   * Register the ERP page's answer to the broker's `order.fetch` rpc: `handler(params)` gets
   * `{order_id}` or `{table_id}` and returns the latest order (or null: not found; a throw is
   * sent back as an error). The broker asks the store's `erp_main`, else a terminal that said
   * `order_authority` in hello: pass `orderAuthority: true` (or `onOrderFetch`) to `connect`
   * for other roles. Returns a function that unregisters the handler.
   * @param {(params: {order_id?: string, table_id?: string}) => Order | null | undefined |
   *   Promise<Order | null | undefined>} handler
   * @returns {() => void}
   */
  onOrderFetch(handler) {
    this._fetchHandler = handler;
    return () => {
      if (this._fetchHandler === handler) this._fetchHandler = null;
    };
  }

  /**
   * The H5 page's pay step: take the payment lock (the broker first pulls the fresh order from
   * the ERP) and get a {@link PaymentSession} with the order, a countdown to `expires_at` on
   * the server's clock, the `charge` to hand the payment provider and `confirmed` (phones),
   * `complete()` (cashiers), and release on `pagehide`.
   *
   * With no order id, the table's order is looked up first (`order.get` by `table_id`, fresh).
   * When the ERP, or (for h5) the broker itself, cannot be reached it throws an
   * {@link ErpUnavailableError} whose `message` is the "pay at the front desk" prompt
   * (`payAtFrontDesk` is true). Other refusals throw their own class (`ORDER_LOCKED`, ...).
   * @param {string | {orderId?: string, tableId?: string, releaseOnPageHide?: boolean,
   *   force?: boolean, operator?: string, reason?: string}} [target]
   * @returns {Promise<PaymentSession>}
   */
  async pay(target = {}) {
    const t = typeof target === "string" ? { orderId: target } : target;
    const h5 = this.role === "h5";
    try {
      let orderId = t.orderId;
      if (!orderId) {
        const tableId = t.tableId ?? this.terminal?.table_id ?? this._claims?.table;
        if (!tableId) throw new TypeError("tablelock: pay() needs an orderId or a tableId");
        const { order } = await this.getOrder({ tableId, fresh: true });
        if (!order) throw makeError("NOT_FOUND", prompt("NOT_FOUND", this.locale));
        orderId = order.order_id;
      }
      const handle = await this.acquire(orderId, "payment", {
        force: t.force, operator: t.operator, reason: t.reason,
      });
      return new PaymentSession(this, handle, { releaseOnPageHide: t.releaseOnPageHide ?? true });
    } catch (err) {
      if (h5 && err instanceof TablelockError && (err.unavailable || err.payAtFrontDesk)) {
        const message = err.payAtFrontDesk ? err.message : prompt("ERP_UNAVAILABLE", this.locale);
        throw new ErpUnavailableError("ERP_UNAVAILABLE", message, { request: err.request, cause: err });
      }
      throw err;
    }
  }

  /** Wait until connected (or reject after `timeoutMs`). */
  _whenConnected(/** @type {number} */ timeoutMs) {
    if (this._connected) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        this.removeEventListener("open", done);
        resolve(undefined);
      };
      const timer = setTimeout(() => {
        this.removeEventListener("open", done);
        reject(makeError("DISCONNECTED", prompt("DISCONNECTED", this.locale)));
      }, timeoutMs);
      this.addEventListener("open", done);
    });
  }
}

// --- mirrors ----------------------------------------------------------------------------

/**
 * The live state of one channel. An `EventTarget`; its events (all `CustomEvent`s):
 *
 * - `change` `{event, replayed, snapshot}`: the state changed. `event` is the raw event frame
 *   (`replayed: true` for events recovered after a reconnect, already in the state), or null
 *   with `snapshot: true` when a whole snapshot was applied (`recovered`, `missed`, `reason`).
 * - `snapshot` `{reason, recovered, missed, seq}`: a snapshot was applied; `reason` is
 *   `subscribe`, `reconnect` or `gap`.
 * - `stale` `{stale}`: the mirror stopped (socket down, re-sync) or resumed being current.
 * - `error` `{error}`: the broker refused the subscription.
 *
 * The state: `orders` (Map order_id -> Order; the store channel keeps open orders only),
 * `locks` (Map `${order_id}/${kind}` -> Lock), `terminals` (Map terminal_id -> Terminal, store
 * channel), `config` (store channel, after a `config.updated`), `seq`.
 */
export class ChannelMirror extends EventTarget {
  /** @param {TablelockClient} client @param {string} channel */
  constructor(client, channel) {
    super();
    const { storeId, orderId } = parseChannel(channel);
    this.client = client;
    this.channel = channel;
    /** @type {"order"|"store"} */
    this.scope = orderId === null ? "store" : "order";
    this.storeId = storeId;
    /** @type {string|null} */
    this.orderId = orderId;
    /** @type {Map<string, Order>} */
    this.orders = new Map();
    /** @type {Map<string, Lock>} */
    this.locks = new Map();
    /** @type {Map<string, Terminal>} */
    this.terminals = new Map();
    /** @type {StoreConfig|null} */
    this.config = null;
    /** The seq of the last event applied (or of the snapshot). */
    this.seq = 0;
    /** @type {boolean|null} the last re-subscribe's `recovered` (null without `since`) */
    this.recovered = null;
    /** @type {"idle"|"syncing"|"live"|"failed"|"closed"} */
    this.state = "idle";
    /** @type {TablelockError|null} */
    this.error = null;
    this._synced = false;
    this._userRef = false;
    this._watchers = 0;
    /** @type {EventFrame[]} */
    this._buffer = [];
    /** @type {ReturnType<typeof deferred<ChannelMirror>>} */
    this._ready = deferred();
    /** Resolves with this mirror once the first snapshot is in. */
    this.ready = this._ready.promise;
  }

  /** True unless the mirror is current (live). */
  get stale() { return this.state !== "live"; }

  /** @returns {Order|null} the order of an `order:` channel (null if the broker has none) */
  get order() {
    return this.orderId === null ? null : this.orders.get(this.orderId) ?? null;
  }

  /**
   * @param {string} orderId
   * @param {LockKind} kind
   * @returns {Lock|null}
   */
  lock(orderId, kind) {
    return this.locks.get(lockKey(orderId, kind)) ?? null;
  }

  /** @param {LockKind} kind @returns {Lock|null} the lock of this kind (order channels) */
  lockOf(kind) {
    return this.orderId === null ? null : this.lock(this.orderId, kind);
  }

  /** @param {string} orderId @returns {Lock[]} the locks held on an order */
  locksOf(orderId) {
    return [...this.locks.values()].filter((l) => l.order_id === orderId);
  }

  /** Stop mirroring (unsubscribes unless a held lock still watches the channel). */
  close() {
    return this.client.unsubscribe(this.channel);
  }

  /** A plain copy of the state (handy for logs, tests and `postMessage`). */
  toJSON() {
    return {
      channel: this.channel, seq: this.seq, state: this.state, stale: this.stale,
      orders: [...this.orders.values()], locks: [...this.locks.values()],
      terminals: [...this.terminals.values()], config: this.config,
    };
  }

  /** @param {"idle"|"syncing"|"live"|"failed"|"closed"} state */
  _setState(state) {
    const was = this.stale;
    this.state = state;
    if (was !== this.stale) this.dispatchEvent(event("stale", { stale: this.stale }));
  }

  _down() {
    if (this.state === "live" || this.state === "syncing") this._setState("idle");
    this._buffer = [];
  }

  /** @param {TablelockError} err */
  _fail(err) {
    this.error = err;
    this._setState("failed");
    this._ready.reject(err);
    this.dispatchEvent(event("error", { error: err }));
  }

  /**
   * (Re)subscribe: with `since` once a snapshot has been seen, so the broker can say what was
   * missed. Events that arrive meanwhile wait in a buffer.
   * @param {"subscribe"|"reconnect"|"gap"} reason
   */
  _subscribe(reason) {
    const client = this.client;
    if (this.state === "closed" || !client.connected) return;
    this._setState("syncing");
    this._buffer = [];
    const gen = client._gen;
    const params = { channel: this.channel, since: this._synced ? this.seq : undefined };
    client.request("subscribe", params).then((reply) => {
      if (gen !== client._gen || this.state !== "syncing") return;
      this._applySnapshot(reply, reason);
    }, (err) => {
      if (gen !== client._gen || this.state !== "syncing") return;
      if (err.code === "TIMEOUT") {
        this._subscribe(reason);
      } else if (!err.unavailable) {
        this._fail(err);
        client._updateStale();
      }
      // DISCONNECTED: the reconnect re-subscribes.
    });
  }

  /**
   * @param {{seq: number, snapshot: any, recovered?: boolean, missed?: EventFrame[]}} reply
   * @param {string} reason
   */
  _applySnapshot(reply, reason) {
    const snap = reply.snapshot ?? {};
    this.orders.clear();
    this.locks.clear();
    if (this.scope === "store") {
      this.terminals.clear();
      for (const order of snap.orders ?? []) this.orders.set(order.order_id, order);
      for (const terminal of snap.terminals ?? []) this.terminals.set(terminal.terminal_id, terminal);
    } else if (snap.order) {
      this.orders.set(snap.order.order_id, snap.order);
    }
    for (const lock of snap.locks ?? []) this.locks.set(lockKey(lock.order_id, lock.kind), lock);
    this.seq = reply.seq;
    this._synced = true;
    this.recovered = reply.recovered ?? null;
    const buffered = this._buffer;
    this._buffer = [];
    this.error = null;
    this._setState("live");
    const missed = reply.missed ?? [];
    // Missed events are already in the snapshot: they are told, not applied.
    for (const frame of missed) {
      this.dispatchEvent(event("change", { event: frame, replayed: true, snapshot: false }));
      this.client._deliver(frame, true);
    }
    const info = { reason, recovered: this.recovered, missed, seq: this.seq };
    this.dispatchEvent(event("snapshot", info));
    this.dispatchEvent(event("change", { event: null, replayed: false, snapshot: true, ...info }));
    this.client._verifyHandles(this);
    this._ready.resolve(this);
    this.client._updateStale();
    buffered.sort((a, b) => (a.seq ?? 0) - (b.seq ?? 0));
    for (const frame of buffered) this._onEvent(frame);
  }

  /** @param {EventFrame} frame */
  _onEvent(frame) {
    if (this.state === "syncing") {
      this._buffer.push(frame);
      return;
    }
    if (this.state !== "live" || typeof frame.seq !== "number") return;
    if (frame.seq <= this.seq) return; // already applied (or in the snapshot)
    if (frame.seq > this.seq + 1) {
      // A gap: something was missed. Ask again with `since`; the snapshot settles it.
      this._subscribe("gap");
      this.client._updateStale();
      this._buffer.push(frame);
      return;
    }
    this.seq = frame.seq;
    this._apply(frame);
    this.dispatchEvent(event("change", { event: frame, replayed: false, snapshot: false }));
    this.client._deliver(frame, false);
  }

  /** @param {EventFrame} frame */
  _apply(frame) {
    const lock = frame.lock;
    switch (frame.event) {
      case "lock.acquired":
        if (lock) this.locks.set(lockKey(lock.order_id, lock.kind), lock);
        break;
      case "lock.released":
      case "lock.expired":
      case "lock.forced":
        if (lock) {
          const key = lockKey(lock.order_id, lock.kind);
          const held = this.locks.get(key);
          if (held && held.token === lock.token) this.locks.delete(key);
        }
        break;
      case "order.updated":
      case "order.paid":
        if (frame.order) this._putOrder(frame.order);
        break;
      case "terminal.online":
        if (frame.terminal) this.terminals.set(frame.terminal.terminal_id, frame.terminal);
        break;
      case "terminal.offline":
        if (frame.terminal) this.terminals.delete(frame.terminal.terminal_id);
        break;
      case "config.updated":
        if (frame.config) this.config = frame.config;
        break;
      default:
        break;
    }
  }

  /** @param {Order} order */
  _putOrder(order) {
    if (this.scope === "store" && order.status && order.status !== "open") {
      this.orders.delete(order.order_id); // the store's snapshot lists open orders only
    } else {
      this.orders.set(order.order_id, order);
    }
  }
}

// --- lock handles -----------------------------------------------------------------------

/**
 * How a lock ended.
 * @typedef {object} LockEnd
 * @property {string} reason `released` (by this client), `upgraded` (this client took the
 *   payment lock), `paid`, or a loss: `forced`, `expired`, `holder_disconnected`,
 *   `revoked` (released by the broker: strong link turned off, order closed), `missing` (not in
 *   the broker's snapshot after a reconnect, e.g. an in-memory broker restarted)
 * @property {boolean} lost true unless this client ended it or the order was paid
 * @property {EventFrame|null} event the event that told, if one did
 * @property {LockHandle} handle
 */

const NOT_LOST = new Set(["released", "upgraded", "paid"]);

/**
 * A lock this client holds. An `EventTarget`: `lost` (`LockEnd`), `ended` (`LockEnd`),
 * `renewed` `{lock}`, `contended` `{event, by, action}` (someone was refused because of it).
 */
export class LockHandle extends EventTarget {
  /**
   * @param {TablelockClient} client
   * @param {Lock|null} lock
   * @param {Order|null} order
   * @param {{orderId: string, kind: LockKind, storeId: string, watch: boolean, autoRenew: boolean}} o
   */
  constructor(client, lock, order, o) {
    super();
    this.client = client;
    this.orderId = o.orderId;
    /** @type {LockKind} */
    this.kind = o.kind;
    this.storeId = o.storeId;
    /** @type {Lock|null} the lock as the broker last showed it */
    this.lock = lock;
    /** @type {Order|null} the order the lock was granted on (for a payment lock: pay this) */
    this.order = order;
    /** False when the store runs with `strong_link` off: nothing is locked. */
    this.enforced = lock !== null;
    /** @type {Lock[]} locks of others that a forced acquire revoked */
    this.forced = [];
    /** @type {"held"|"ended"} */
    this.state = lock ? "held" : "ended";
    /** @type {LockEnd|null} */
    this.end = null;
    this._watch = o.watch;
    this._renews = o.autoRenew;
    this._releasing = false;
    this._renewDue = false;
    /** @type {any} */
    this._renewTimer = null;
    /** @type {ReturnType<typeof deferred<LockEnd>>} */
    this._lost = deferred();
    /** @type {ReturnType<typeof deferred<LockEnd>>} */
    this._ended = deferred();
    /** Resolves when the lock is lost (forced, expired, revoked, missing); never rejects. */
    this.lost = this._lost.promise;
    /** Resolves however the lock ends (including this client's release and payment). */
    this.ended = this._ended.promise;
    if (!lock) {
      this.end = { reason: "released", lost: false, event: null, handle: this };
      this._ended.resolve(this.end);
    }
  }

  /** `${orderId}/${kind}` */
  get key() { return lockKey(this.orderId, this.kind); }
  /** True while the lock is held (as far as the broker has told). */
  get held() { return this.state === "held"; }
  /** @returns {number|null} the fencing token: send it with every write under this lock */
  get token() { return this.lock ? this.lock.token : null; }
  /** @returns {number|null} when the lock ends unless renewed (server clock, epoch ms) */
  get expiresAt() { return this.lock ? this.lock.expires_at : null; }
  /** @returns {number|null} */
  get acquiredAt() { return this.lock ? this.lock.acquired_at : null; }
  /** @returns {number|null} the order version the lock was granted at */
  get orderVersion() { return this.lock ? this.lock.order_version : null; }

  /** Milliseconds until `expiresAt` on the broker's clock (0 when past or not held). */
  msLeft() {
    if (!this.lock || !this.held) return 0;
    return Math.max(0, this.lock.expires_at - this.client.serverNow());
  }

  _start() {
    if (this._watch) this.client._watch(`order:${this.storeId}:${this.orderId}`);
    this._scheduleRenew();
  }

  /** @param {Lock} lock */
  _update(lock) {
    if (lock.token === this.token) this.lock = lock;
  }

  /**
   * Release the lock. Resolves once the broker confirms; a lock that was already gone
   * (expired, forced, paid) resolves too, with the handle ended for that reason.
   * @returns {Promise<void>}
   */
  async release() {
    if (!this.held) return;
    try {
      await this.client.release(this.orderId, this.kind, { token: this.token ?? undefined });
    } catch (err) {
      const reason = err instanceof TablelockError ? GONE[err.code] : undefined;
      if (!reason) throw err;
      this._end(reason, null);
    }
  }

  /** Send the release without waiting (for `pagehide`: the page may be gone before a reply). */
  releaseSoon() {
    this.release().catch(noop);
  }

  /**
   * Renew now (ERP roles; the handle does this itself at a third of `erp_lock_ttl_ms`).
   * @returns {Promise<Lock|null>}
   */
  async renew() {
    if (!this.held || this.token === null) return this.lock;
    try {
      const reply = await this.client.renew(this.orderId, this.kind, this.token);
      if (reply.lock) {
        this._update(reply.lock);
        this.dispatchEvent(event("renewed", { lock: reply.lock }));
      }
      this._scheduleRenew();
      return this.lock;
    } catch (err) {
      const reason = err instanceof TablelockError ? GONE[err.code] : undefined;
      if (reason) this._end(reason, null);
      throw err;
    }
  }

  _scheduleRenew() {
    clearTimeout(this._renewTimer);
    this._renewDue = false;
    if (!this._renews || !this.held || !this.lock) return;
    const lock = this.lock;
    const ttl = this.client.config?.erp_lock_ttl_ms ?? lock.expires_at - lock.acquired_at;
    const left = lock.expires_at - this.client.serverNow();
    const delay = Math.max(500, Math.min(ttl / 3, left / 2));
    this._renewTimer = setTimeout(() => this._renewTick(), delay);
  }

  _renewTick() {
    if (!this.held) return;
    if (!this.client.connected) {
      this._renewDue = true; // renewed as soon as the client reconnects
      return;
    }
    this._autoRenew();
  }

  _autoRenew() {
    this._renewDue = false;
    this.renew().catch((err) => {
      if (this.held && err instanceof TablelockError && err.unavailable) {
        if (this.client.connected) {
          clearTimeout(this._renewTimer);
          this._renewTimer = setTimeout(() => this._renewTick(), 2000);
        } else {
          this._renewDue = true;
        }
      }
    });
  }

  _stopRenewing() {
    clearTimeout(this._renewTimer);
    this._renews = false;
  }

  /** True when this handle renews itself (ERP roles). */
  get autoRenews() { return this._renews; }

  /**
   * @param {string} reason
   * @param {EventFrame|null} frame
   */
  _end(reason, frame) {
    if (!this.held) return;
    if (reason === "released" && !this._releasing) reason = "revoked";
    this.state = "ended";
    clearTimeout(this._renewTimer);
    /** @type {LockEnd} */
    const end = { reason, lost: !NOT_LOST.has(reason), event: frame, handle: this };
    this.end = end;
    const client = this.client;
    if (client._handles.get(this.key) === this) client._handles.delete(this.key);
    if (this._watch) client._unwatch(`order:${this.storeId}:${this.orderId}`);
    if (end.lost) {
      this._lost.resolve(end);
      this.dispatchEvent(event("lost", end));
    }
    this._ended.resolve(end);
    this.dispatchEvent(event("ended", end));
  }
}

/** A refusal that means the lock is already gone, and why. @type {Record<string, string>} */
const GONE = {
  LOCK_EXPIRED: "expired",
  FENCED: "forced",
  NOT_HOLDER: "missing",
  NOT_FOUND: "missing",
  ORDER_PAID: "paid",
};

// --- the H5 payment helper --------------------------------------------------------------

/**
 * One payment in progress on an H5 page (or at a cashier): the payment lock, the order to
 * pay, a countdown on the broker's clock. A phone hands `charge` to the payment provider and
 * waits for `confirmed`; a cashier records its own payment with `complete()`. An
 * `EventTarget`: `lost` (`LockEnd`: expired, forced, ...) and `ended` (`LockEnd`).
 */
export class PaymentSession extends EventTarget {
  /**
   * @param {TablelockClient} client
   * @param {LockHandle} handle
   * @param {{releaseOnPageHide: boolean}} options
   */
  constructor(client, handle, options) {
    super();
    this.client = client;
    /** The payment lock. */
    this.handle = handle;
    /** @type {Order|null} the fresh order the lock was granted on */
    this.order = handle.order;
    this.orderId = handle.orderId;
    /** @type {{order: Order, payment: PaymentRecord}|null} the result, once paid */
    this.result = null;
    /** @type {Promise<{order: Order, payment: PaymentRecord|null}>|null} */
    this._confirmed = null;
    this.lost = handle.lost;
    this.ended = handle.ended;
    handle.addEventListener("lost", (e) => this.dispatchEvent(event("lost", /** @type {CustomEvent} */ (e).detail)));
    handle.addEventListener("ended", (e) => {
      this._unlistenPageHide();
      this.dispatchEvent(event("ended", /** @type {CustomEvent} */ (e).detail));
    });
    this._onPageHide = () => {
      if (this.handle.held) this.handle.releaseSoon();
    };
    this._pageHide = false;
    if (options.releaseOnPageHide && handle.held) this.releaseOnPageHide(true);
  }

  /** @returns {number|null} the fencing token */
  get token() { return this.handle.token; }
  /** @returns {number|null} */
  get expiresAt() { return this.handle.expiresAt; }
  /** @returns {number} the amount to pay */
  get amountCents() { return this.order ? this.order.amount_cents : 0; }
  /** @returns {number} the version to pay */
  get version() { return this.order ? this.order.version : this.handle.orderVersion ?? 0; }
  /** True while the lock is held. */
  get active() { return this.handle.held; }

  /**
   * What the payment provider needs so that the platform's payment service can record the
   * payment under this lock (`POST /v1/stores/{store_id}/orders/{order_id}/payment`).
   * @returns {{store_id: string, order_id: string, token: number|null, version: number,
   *   amount_cents: number}}
   */
  get charge() {
    return { store_id: this.handle.storeId, order_id: this.orderId, token: this.token,
             version: this.version, amount_cents: this.amountCents };
  }

  /**
   * Resolves with `{order, payment}` when the broker pushes `order.paid` for this order (the
   * payment service recorded it); rejects with `LockExpiredError` or `FencedError` when the
   * lock is lost first and the order, read again, is not paid.
   * @returns {Promise<{order: Order, payment: PaymentRecord|null}>}
   */
  get confirmed() {
    this._confirmed ??= this._confirm();
    return this._confirmed;
  }

  /** @returns {Promise<{order: Order, payment: PaymentRecord|null}>} */
  async _confirm() {
    const client = this.client;
    /** @type {(e: Event) => void} */
    let listener = noop;
    const paid = new Promise((resolve) => {
      listener = (e) => {
        const frame = /** @type {CustomEvent} */ (e).detail.event;
        if (frame.order?.order_id === this.orderId) resolve({ order: frame.order, payment: frame.payment ?? null });
      };
      client.addEventListener("order.paid", listener);
    });
    const lost = this.handle.lost.then(async (end) => {
      // The lock may end as "missing" because the order was paid while the socket was down.
      const read = await client.getOrder(this.orderId).catch(() => null);
      if (read?.order?.status === "paid") return { order: read.order, payment: null };
      const code = end.reason === "expired" ? "LOCK_EXPIRED" : "FENCED";
      throw makeError(code, prompt(code, client.locale), { request: "payment.complete" });
    });
    try {
      return /** @type {{order: Order, payment: PaymentRecord|null}} */ (await Promise.race([paid, lost]));
    } finally {
      client.removeEventListener("order.paid", listener);
    }
  }

  /** Milliseconds left to pay, on the broker's clock (corrected by the clock offset). */
  msLeft() {
    return this.handle.msLeft();
  }

  /**
   * Call `callback(msLeft, session)` now and every `intervalMs` until the lock ends or the time
   * is up (the last call gets 0). Returns a function that stops it.
   * @param {(msLeft: number, session: PaymentSession) => void} callback
   * @param {{intervalMs?: number}} [options]
   * @returns {() => void}
   */
  countdown(callback, options = {}) {
    const every = options.intervalMs ?? 250;
    /** @type {any} */
    let timer = null;
    const stop = () => {
      clearInterval(timer);
      this.handle.removeEventListener("ended", tick);
    };
    const tick = () => {
      const left = this.msLeft();
      callback(left, this);
      if (left <= 0 || !this.handle.held) stop();
    };
    timer = setInterval(tick, every);
    this.handle.addEventListener("ended", tick);
    tick();
    return stop;
  }

  /**
   * Turn the release on `pagehide` on or off. Turn it off before sending the page to a
   * payment app that navigates away, so the lock is kept (it ends at its TTL).
   * @param {boolean} on
   */
  releaseOnPageHide(on) {
    if (on && !this._pageHide && globalThis.addEventListener) {
      globalThis.addEventListener("pagehide", this._onPageHide);
      this._pageHide = true;
    } else if (!on) {
      this._unlistenPageHide();
    }
  }

  _unlistenPageHide() {
    if (this._pageHide) {
      globalThis.removeEventListener?.("pagehide", this._onPageHide);
      this._pageHide = false;
    }
  }

  /**
   * Record the payment under this lock (cashier pages: `payment.complete` with the lock's
   * token, the order's version and amount; an `h5` session throws `ForbiddenError`). If the connection drops meanwhile, it waits for the reconnect and
   * retries with the same `paymentRef` (the broker answers a retry with the same success).
   * @param {{paymentRef: string, amountCents?: number, version?: number, retries?: number,
   *   reconnectWaitMs?: number}} params
   * @returns {Promise<{order: Order, payment: PaymentRecord}>}
   */
  async complete(params) {
    const request = {
      orderId: this.orderId,
      token: this.token,
      version: params.version ?? this.version,
      amountCents: params.amountCents ?? this.amountCents,
      paymentRef: params.paymentRef,
    };
    let retries = params.retries ?? 2;
    for (;;) {
      try {
        this.result = await this.client.completePayment(request);
        this._unlistenPageHide();
        return this.result;
      } catch (err) {
        if (!(err instanceof TablelockError) || !err.unavailable || retries-- <= 0) throw err;
        await this.client._whenConnected(params.reconnectWaitMs ?? 10_000);
      }
    }
  }

  /** Give the payment lock back (the customer cancelled). */
  cancel() {
    this._unlistenPageHide();
    return this.handle.release();
  }
}

// --- entry point ------------------------------------------------------------------------

/**
 * Connect and say hello. Resolves with the client once the first hello succeeded; rejects with
 * `AuthFailedError` / `UnsupportedProtocolError`, or a `DisconnectedError` when the broker could
 * not be reached within `connectTimeoutMs` (the client is then closed). After that, the client
 * reconnects on its own whenever the socket drops.
 * @param {ClientOptions & {connectTimeoutMs?: number}} options
 * @returns {Promise<TablelockClient>}
 */
export async function connect(options) {
  const client = new TablelockClient(options);
  const timeoutMs = options.connectTimeoutMs ?? 10_000;
  /** @type {any} */
  let timer = null;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(makeError("DISCONNECTED",
      prompt("DISCONNECTED", options.locale ?? "zh-CN"), { request: "hello" })), timeoutMs);
  });
  try {
    await Promise.race([client.ready, timeout]);
    return client;
  } catch (err) {
    client.close();
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

export default { connect, TablelockClient, TablelockError, ErrorCode, prompt };
