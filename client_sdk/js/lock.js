// @ts-check
/**
 * LockHandle: a lock this client holds, its renewal, and how it ended.
 * @module tablelock/lock
 */

/** @typedef {import("./types.js").Order} Order */
/** @typedef {import("./types.js").Lock} Lock */
/** @typedef {import("./types.js").LockKind} LockKind */
/** @typedef {import("./types.js").EventFrame} EventFrame */
/** @typedef {import("./client.js").TablelockClient} TablelockClient */

import { LOST_LOCK_REASONS } from "./constants.js";
import { TablelockError } from "./errors.js";
import { capability, deferred, event, lockKey, noop } from "./helpers.js";
import {
  END, FORGET_HANDLE, RELEASING, RENEW_IF_DUE, SCHEDULE_RENEW, START, STOP_RENEWING, UNWATCH,
  UPDATE_LOCK, WATCH,
} from "./internal.js";

/**
 * How a lock ended.
 * @typedef {object} LockEnd
 * @property {string} reason one of LOST_LOCK_REASONS (constants.js), the same words in both
 *   SDKs: `released` (by this client, or by the broker: strong link turned off, order closed),
 *   `upgraded` (this client took the payment lock), `paid`, `holder_disconnected`, `expired`,
 *   `forced`, or `gone` (not in the broker's snapshot after a reconnect, cause unknown: an
 *   in-memory broker restarted, say)
 * @property {boolean} lost true unless this client released it, upgraded it or the order was
 *   paid
 * @property {EventFrame|null} event the event that told, if one did
 * @property {LockHandle} handle
 */

// How a lock ends without being lost (besides "released" by this client itself).
const NOT_LOST = new Set(["upgraded", "paid"]);

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
    /** This client is releasing the lock: a `released` is not a loss. */
    this[RELEASING] = false;
    this._renewDue = false;
    /** @type {any} */
    this._renewTimer = null;
    /** @type {ReturnType<typeof deferred<LockEnd>>} */
    this._lost = deferred();
    /** @type {ReturnType<typeof deferred<LockEnd>>} */
    this._ended = deferred();
    /** Resolves when the lock is lost (forced, expired, gone, ...); never rejects. */
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

  [START]() {
    if (this._watch) this.client[WATCH](`order:${this.storeId}:${this.orderId}`);
    this[SCHEDULE_RENEW]();
  }

  /** @param {Lock} lock */
  [UPDATE_LOCK](lock) {
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
      this[END](reason, null);
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
        this[UPDATE_LOCK](reply.lock);
        this.dispatchEvent(event("renewed", { lock: reply.lock }));
      }
      this[SCHEDULE_RENEW]();
      return this.lock;
    } catch (err) {
      const reason = err instanceof TablelockError ? GONE[err.code] : undefined;
      if (reason) this[END](reason, null);
      throw err;
    }
  }

  [SCHEDULE_RENEW]() {
    clearTimeout(this._renewTimer);
    this._renewDue = false;
    if (!this._renews || !this.held || !this.lock) return;
    const lock = this.lock;
    // The TTL of this holder's locks: the config field the capability table names.
    const field = capability(lock.holder.role, "lock_ttl");
    const config = /** @type {Record<string, any>|null} */ (this.client.config);
    const ttl = (field && config?.[field]) ?? lock.expires_at - lock.acquired_at;
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

  [RENEW_IF_DUE]() {
    if (this._renewDue) this._autoRenew();
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

  [STOP_RENEWING]() {
    clearTimeout(this._renewTimer);
    this._renews = false;
  }

  /** True when this handle renews itself (ERP roles). */
  get autoRenews() { return this._renews; }

  /**
   * @param {string} reason
   * @param {EventFrame|null} frame
   */
  [END](reason, frame) {
    if (!this.held) return;
    // A reason this SDK does not know yet (a newer broker's) is told as "gone".
    if (!LOST_LOCK_REASONS.includes(reason)) reason = "gone";
    this.state = "ended";
    clearTimeout(this._renewTimer);
    const lost = reason === "released" ? !this[RELEASING] : !NOT_LOST.has(reason);
    /** @type {LockEnd} */
    const end = { reason, lost, event: frame, handle: this };
    this.end = end;
    this.client[FORGET_HANDLE](this);
    if (this._watch) this.client[UNWATCH](`order:${this.storeId}:${this.orderId}`);
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
  NOT_HOLDER: "gone",
  NOT_FOUND: "gone",
  ORDER_PAID: "paid",
};
