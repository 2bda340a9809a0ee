// @ts-check
/**
 * The client: requests, mirrors, lock handles and the H5 pay step, over the connection.
 * @module tablelock/client
 */

/** @typedef {import("./types.js").Order} Order */
/** @typedef {import("./types.js").Lock} Lock */
/** @typedef {import("./types.js").LockKind} LockKind */
/** @typedef {import("./types.js").Action} Action */
/** @typedef {import("./types.js").Change} Change */
/** @typedef {import("./types.js").EventFrame} EventFrame */
/** @typedef {import("./types.js").PaymentRecord} PaymentRecord */
/** @typedef {import("./types.js").CheckResult} CheckResult */

import { CONFIG_DEFAULTS } from "./constants.js";
import { TablelockConnection } from "./connection.js";
import { ErpUnavailableError, makeError, outcomeUnknown, prompt, TablelockError } from "./errors.js";
import { capability, event, lockKey, noop } from "./helpers.js";
import {
  CONNECTION_CLOSED, CONNECTION_DOWN, CONNECTION_FAILED, CONNECTION_UP, DELIVER, END,
  EVENT_FRAME, FETCH_TIMEOUT_MS, FORGET_HANDLE, MIRROR_CLOSED, MIRROR_DOWN, MIRROR_EVENT,
  MIRROR_FAILED, RELEASING, RENEW_IF_DUE, SCHEDULE_RENEW, SET_CONFIG, SET_STALE, START,
  STOP_RENEWING, SUBSCRIBE, SYNCED, UNWATCH, UPDATE_LOCK, UPDATE_STALE, USER_REF, VERIFY_HANDLES,
  WATCH, WATCHERS,
} from "./internal.js";
import { LockHandle } from "./lock.js";
import { ChannelMirror } from "./mirror.js";
import { PaymentSession } from "./payment.js";

export class TablelockClient extends TablelockConnection {
  /** @param {import("./connection.js").ClientOptions} options */
  constructor(options) {
    super(options);
    /** @type {Map<string, ChannelMirror>} */
    this._mirrors = new Map();
    /** @type {Map<string, LockHandle>} */
    this._handles = new Map();
  }

  /** @returns {ReadonlyMap<string, LockHandle>} the locks this client holds, by `orderId/kind` */
  get handles() { return this._handles; }
  /** @returns {ReadonlyMap<string, ChannelMirror>} the channels this client mirrors */
  get mirrors() { return this._mirrors; }

  // --- following the connection --------------------------------------------------------------

  [CONNECTION_UP]() {
    // Re-subscribe every mirror at its position (their snapshots also settle the lock handles),
    // and renew the locks whose renewal fell due while the socket was down.
    for (const mirror of this._mirrors.values()) mirror[SUBSCRIBE]("reconnect");
    for (const handle of this._handles.values()) handle[RENEW_IF_DUE]();
    this[UPDATE_STALE]();
  }

  [CONNECTION_DOWN]() {
    for (const mirror of this._mirrors.values()) mirror[MIRROR_DOWN]();
    this[UPDATE_STALE]();
  }

  /** @param {TablelockError} err */
  [CONNECTION_FAILED](err) {
    for (const mirror of this._mirrors.values()) mirror[MIRROR_FAILED](err);
  }

  [CONNECTION_CLOSED]() {
    for (const handle of this._handles.values()) handle[STOP_RENEWING]();
    for (const mirror of this._mirrors.values()) mirror[MIRROR_CLOSED]();
  }

  [UPDATE_STALE]() {
    // Stale: the socket is down, or a mirror that was current is re-syncing (after a
    // reconnect or a gap). A channel subscribed for the first time is not "stale data".
    let stale = !this.connected;
    if (!stale) {
      for (const mirror of this._mirrors.values()) {
        if (mirror[SYNCED] && (mirror.state === "syncing" || mirror.state === "idle")) {
          stale = true;
        }
      }
    }
    this[SET_STALE](stale);
  }

  // --- frames ------------------------------------------------------------------------------

  /** @param {EventFrame} frame */
  [EVENT_FRAME](frame) {
    const mirror = frame.channel ? this._mirrors.get(frame.channel) : undefined;
    if (mirror) {
      mirror[MIRROR_EVENT](frame); // the mirror delivers it once it is in order
    } else {
      this[DELIVER](frame, false);
    }
  }

  /**
   * An event in order (live, replayed from `missed`, or direct): lock handles, then listeners.
   * @param {EventFrame} frame
   * @param {boolean} replayed
   */
  [DELIVER](frame, replayed) {
    this._routeToHandles(frame);
    if (frame.event === "config.updated" && frame.config) this[SET_CONFIG](frame.config);
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
        handle[END]("forced", frame);
        break;
      case "lock.expired":
        handle[END]("expired", frame);
        break;
      case "lock.released":
        handle[END](frame.reason ?? "released", frame);
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
  [VERIFY_HANDLES](mirror) {
    for (const handle of [...this._handles.values()]) {
      if (!handle.held || !handle.enforced || handle.storeId !== mirror.storeId) continue;
      if (mirror.orderId !== null && handle.orderId !== mirror.orderId) continue;
      const lock = mirror.locks.get(handle.key);
      if (!lock || lock.token !== handle.token) {
        handle[END]("gone", null);
      } else {
        handle[UPDATE_LOCK](lock);
      }
    }
  }

  // --- requests ----------------------------------------------------------------------------

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
    }, { timeoutMs: t.fresh ? this[FETCH_TIMEOUT_MS]() : undefined });
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
   *   to what the capability table says of this role (`renew`: an h5 payment lock is never renewed)
   * @returns {Promise<LockHandle>}
   */
  async acquire(orderId, kind = "order", options = {}) {
    let reply;
    try {
      reply = await this.request("lock.acquire", {
        order_id: orderId, kind, force: options.force || undefined,
        operator: options.operator, reason: options.reason,
      }, { timeoutMs: this[FETCH_TIMEOUT_MS]() });
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
      if (mine && mine.token === lock.token) mine[END]("upgraded", null);
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
      existing[UPDATE_LOCK](lock);
      existing[SCHEDULE_RENEW]();
      return existing;
    }
    if (existing && existing.held) existing[END]("gone", null);
    const handle = new LockHandle(this, lock, reply.order ?? null, {
      orderId: lock.order_id, kind: lock.kind, storeId: lock.store_id,
      watch: options.watch ?? true,
      autoRenew: options.autoRenew ?? capability(this.role, "renew") !== false,
    });
    handle.forced = reply.forced ?? [];
    this._handles.set(key, handle);
    handle[START]();
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
    if (mine) mine[RELEASING] = true;
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
      mine?.[END]("released", null);
      return reply;
    } catch (err) {
      if (mine) mine[RELEASING] = false;
      throw err;
    }
  }

  /**
   * `payment.complete` (ERP and manager pages): record a counter payment under the payment
   * lock's token, at the order's current version and amount. Retrying with the same
   * `paymentRef` after a network error is safe (idempotent); after an `UNAVAILABLE` with
   * `"outcome": "unknown"` it reads the order and asks once more with the same ref, so the
   * answer is the truth. A role that may not record a payment (`record_payment` in the
   * capability table: `h5`) throws a `ForbiddenError` and sends nothing: a phone pays through
   * the payment provider (see {@link PaymentSession#charge}).
   * @param {{orderId: string, token?: number|null, version: number, amountCents: number,
   *   paymentRef: string}} params
   * @returns {Promise<{order: Order, payment: PaymentRecord}>}
   */
  async completePayment(params) {
    if (capability(this.role, "record_payment") === false) {
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
      if (handle.orderId === params.orderId) handle[END]("paid", null);
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
    if (this.closed) throw makeError("DISCONNECTED", "the client was closed");
    const mirror = this._mirror(channel);
    mirror[USER_REF] = true;
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
    mirror[USER_REF] = false;
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
      if (this.failure) {
        mirror[MIRROR_FAILED](this.failure);
      } else {
        mirror[SUBSCRIBE]("subscribe");
        this[UPDATE_STALE]();
      }
    }
    return mirror;
  }

  /** @param {string} channel */
  [WATCH](channel) {
    const mirror = this._mirror(channel);
    mirror[WATCHERS]++;
    return mirror;
  }

  /** @param {string} channel */
  [UNWATCH](channel) {
    const mirror = this._mirrors.get(channel);
    if (!mirror) return;
    mirror[WATCHERS] = Math.max(0, mirror[WATCHERS] - 1);
    this._maybeDrop(mirror).catch(noop);
  }

  /** @param {LockHandle} handle */
  [FORGET_HANDLE](handle) {
    if (this._handles.get(handle.key) === handle) this._handles.delete(handle.key);
  }

  /** @param {ChannelMirror} mirror */
  async _maybeDrop(mirror) {
    if (mirror[USER_REF] || mirror[WATCHERS] > 0) return;
    const wasSubscribed = mirror.state === "live" || mirror.state === "syncing";
    mirror[MIRROR_CLOSED]();
    if (this._mirrors.get(mirror.channel) === mirror) this._mirrors.delete(mirror.channel);
    this[UPDATE_STALE]();
    if (wasSubscribed && this.connected) {
      await this.request("unsubscribe", { channel: mirror.channel }).catch(noop);
    }
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
    // A terminal that cannot record a payment itself (a phone) sends the customer to the
    // front desk when the broker or the ERP cannot be reached.
    const frontDesk = capability(this.role, "record_payment") === false;
    try {
      let orderId = t.orderId;
      if (!orderId) {
        const tableId = t.tableId ?? this.tableId;
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
      if (frontDesk && err instanceof TablelockError && (err.unavailable || err.payAtFrontDesk)) {
        const message = err.payAtFrontDesk ? err.message : prompt("ERP_UNAVAILABLE", this.locale);
        throw new ErpUnavailableError("ERP_UNAVAILABLE", message, { request: err.request, cause: err });
      }
      throw err;
    }
  }
}

/**
 * Connect and say hello. Resolves with the client once the first hello succeeded; rejects with
 * `AuthFailedError` / `UnsupportedProtocolError`, or a `DisconnectedError` when the broker could
 * not be reached within `connectTimeoutMs` (the client is then closed). After that, the client
 * reconnects on its own whenever the socket drops.
 * @param {import("./connection.js").ClientOptions & {connectTimeoutMs?: number}} options
 * @returns {Promise<TablelockClient>}
 */
export async function connect(options) {
  const client = new TablelockClient(options);
  const timeoutMs = options.connectTimeoutMs ?? 10_000;
  /** @type {any} */
  let timer = null;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(makeError("DISCONNECTED",
      prompt("DISCONNECTED", options.locale ?? CONFIG_DEFAULTS.locale), { request: "hello" })), timeoutMs);
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
