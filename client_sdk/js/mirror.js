// @ts-check
/**
 * ChannelMirror: the live state of one subscribed channel.
 * @module tablelock/mirror
 */

/** @typedef {import("./types.js").Order} Order */
/** @typedef {import("./types.js").Lock} Lock */
/** @typedef {import("./types.js").Terminal} Terminal */
/** @typedef {import("./types.js").StoreConfig} StoreConfig */
/** @typedef {import("./types.js").EventFrame} EventFrame */
/** @typedef {import("./types.js").LockKind} LockKind */
/** @typedef {import("./client.js").TablelockClient} TablelockClient */
/** @typedef {import("./errors.js").TablelockError} TablelockError */

import { deferred, event, lockKey, parseChannel } from "./helpers.js";
import {
  DELIVER, GENERATION, MIRROR_CLOSED, MIRROR_DOWN, MIRROR_EVENT, MIRROR_FAILED, SUBSCRIBE,
  SYNCED, UPDATE_STALE, USER_REF, VERIFY_HANDLES, WATCHERS,
} from "./internal.js";

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
    /** @type {string|null} the epoch of the channel's numbering that `seq` belongs to */
    this.epoch = null;
    /** @type {boolean|null} the last re-subscribe's `recovered` (null without `since`) */
    this.recovered = null;
    /** @type {"idle"|"syncing"|"live"|"failed"|"closed"} */
    this.state = "idle";
    /** @type {TablelockError|null} */
    this.error = null;
    this._synced = false;
    /** The application subscribed to this channel itself (the client keeps this count). */
    this[USER_REF] = false;
    /** How many held locks watch this channel (the client keeps this count). */
    this[WATCHERS] = 0;
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
      channel: this.channel, seq: this.seq, epoch: this.epoch, state: this.state,
      stale: this.stale,
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

  /** @returns {boolean} */
  get [SYNCED]() { return this._synced; }

  [MIRROR_CLOSED]() {
    this._setState("closed");
  }

  [MIRROR_DOWN]() {
    if (this.state === "live" || this.state === "syncing") this._setState("idle");
    this._buffer = [];
  }

  /** @param {TablelockError} err */
  [MIRROR_FAILED](err) {
    this.error = err;
    this._setState("failed");
    this._ready.reject(err);
    this.dispatchEvent(event("error", { error: err }));
  }

  /**
   * (Re)subscribe: at the mirror's position (`since` and `epoch`) once a snapshot has been
   * seen, so the broker can say what was missed, on whichever broker this is (another epoch:
   * the numbering started over, and the snapshot is the truth). Events that arrive meanwhile
   * wait in a buffer.
   * @param {"subscribe"|"reconnect"|"gap"} reason
   */
  [SUBSCRIBE](reason) {
    const client = this.client;
    if (this.state === "closed" || !client.connected) return;
    this._setState("syncing");
    this._buffer = [];
    const gen = client[GENERATION];
    const params = this._synced
      ? { channel: this.channel, since: this.seq, epoch: this.epoch ?? undefined }
      : { channel: this.channel };
    client.request("subscribe", params).then((reply) => {
      if (gen !== client[GENERATION] || this.state !== "syncing") return;
      this._applySnapshot(reply, reason);
    }, (err) => {
      if (gen !== client[GENERATION] || this.state !== "syncing") return;
      if (err.code === "TIMEOUT") {
        this[SUBSCRIBE](reason);
      } else if (!err.unavailable) {
        this[MIRROR_FAILED](err);
        client[UPDATE_STALE]();
      }
      // DISCONNECTED: the reconnect re-subscribes.
    });
  }

  /**
   * @param {{seq: number, epoch: string, snapshot: any, recovered?: boolean, missed?: EventFrame[]}} reply
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
    this.epoch = reply.epoch;
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
      this.client[DELIVER](frame, true);
    }
    const info = { reason, recovered: this.recovered, missed, seq: this.seq };
    this.dispatchEvent(event("snapshot", info));
    this.dispatchEvent(event("change", { event: null, replayed: false, snapshot: true, ...info }));
    this.client[VERIFY_HANDLES](this);
    this._ready.resolve(this);
    this.client[UPDATE_STALE]();
    buffered.sort((a, b) => (a.seq ?? 0) - (b.seq ?? 0));
    for (const frame of buffered) this[MIRROR_EVENT](frame);
  }

  /** @param {EventFrame} frame */
  [MIRROR_EVENT](frame) {
    if (this.state === "syncing") {
      this._buffer.push(frame);
      return;
    }
    if (this.state !== "live" || typeof frame.seq !== "number") return;
    if (frame.seq <= this.seq) return; // already applied (or in the snapshot)
    if (frame.seq > this.seq + 1) {
      // A gap: something was missed. Ask again with `since`; the snapshot settles it.
      this[SUBSCRIBE]("gap");
      this.client[UPDATE_STALE]();
      this._buffer.push(frame);
      return;
    }
    this.seq = frame.seq;
    this._apply(frame);
    this.dispatchEvent(event("change", { event: frame, replayed: false, snapshot: false }));
    this.client[DELIVER](frame, false);
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
