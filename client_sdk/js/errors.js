// @ts-check
/**
 * Refusals as error classes (one per code), and the screens' prompts.
 * @module tablelock/errors
 */

import { ERROR_CODES, PROMPTS as BROKER_PROMPTS } from "./constants.js";

/** @typedef {import("./types.js").Lock} Lock */
/** @typedef {import("./types.js").Holder} Holder */
/** @typedef {import("./types.js").Order} Order */

/** The SDK's own codes: the socket is down, or no reply came in time. */
const SDK_CODES = ["DISCONNECTED", "TIMEOUT"];

/**
 * Every error code: every code the broker sends (constants.js), plus the SDK's own
 * `DISCONNECTED` (the socket is down, or closed while the request was in flight) and `TIMEOUT`
 * (no reply in time).
 * @type {Readonly<Record<string, string>>}
 */
export const ErrorCode = Object.freeze(
  Object.fromEntries([...ERROR_CODES, ...SDK_CODES].map((code) => [code, code])));

/** Codes that mean "the broker could not answer": the screen must not guess a lock state. */
const UNREACHABLE = new Set(["UNAVAILABLE", ...SDK_CODES]);

/**
 * The texts of the SDK's own refusals, which the broker never sends: by code, then variant
 * (`h5_payment`: the `FORBIDDEN` of a phone that would record a payment), then locale.
 * @type {Record<string, Record<string, Record<string, string>>>}
 */
const SDK_PROMPTS = {
  FORBIDDEN: {
    h5_payment: {
      "zh-CN": "顾客手机不能记录支付：请通过支付服务商付款，由支付服务确认",
      en: "A phone does not record payments: pay through the payment provider, whose payment " +
        "service records the payment.",
    },
  },
  DISCONNECTED: {
    "": {
      "zh-CN": "与锁服务的连接已断开，请稍后再试",
      en: "The connection to the lock service is down. Please try again shortly.",
    },
  },
  TIMEOUT: {
    "": {
      "zh-CN": "锁服务响应超时，请稍后再试",
      en: "The lock service did not answer in time. Please try again shortly.",
    },
  },
};

/**
 * The screen prompt for `code` (PROTOCOL.md section 7): the broker's own texts (constants.js)
 * and the SDK's. `variant` picks a qualified text: `"h5"` for `PAYMENT_LOCKED` on a customer's
 * page, `"presettle"` for `ACCEPT_BLOCKED` by a pre-bill, `"h5_payment"` for the `FORBIDDEN` of
 * a phone that would record a payment. Anything but `"en"` reads zh-CN, as the broker does.
 * @param {string} code
 * @param {string} [locale]
 * @param {string} [variant]
 * @returns {string}
 */
export function prompt(code, locale = "zh-CN", variant = "") {
  const variants = { .../** @type {Record<string, Record<string, Record<string, string>>>} */
    (BROKER_PROMPTS)[code], ...SDK_PROMPTS[code] };
  const texts = (variant && variants[variant]) || variants[""];
  if (!texts) return code;
  return locale === "en" ? texts.en : texts["zh-CN"];
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
export function makeError(code, message, options) {
  const Cls = ERROR_CLASSES[code] ?? TablelockError;
  return new Cls(code, message, options);
}

/** A write the broker may or may not have applied: read the order before saying anything. */
export function outcomeUnknown(/** @type {unknown} */ err) {
  return err instanceof TablelockError && err.code === "UNAVAILABLE" && err.outcome === "unknown";
}

