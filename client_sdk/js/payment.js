// @ts-check
/**
 * PaymentSession: one payment in progress on an H5 page or at a cashier.
 * @module tablelock/payment
 */

/** @typedef {import("./types.js").Order} Order */
/** @typedef {import("./types.js").PaymentRecord} PaymentRecord */
/** @typedef {import("./client.js").TablelockClient} TablelockClient */
/** @typedef {import("./lock.js").LockHandle} LockHandle */

import { makeError, prompt, TablelockError } from "./errors.js";
import { event, noop } from "./helpers.js";

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
      // The lock may end as "gone" because the order was paid while the socket was down.
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
        await this.client.whenConnected(params.reconnectWaitMs ?? 10_000);
      }
    }
  }

  /** Give the payment lock back (the customer cancelled). */
  cancel() {
    this._unlistenPageHide();
    return this.handle.release();
  }
}
