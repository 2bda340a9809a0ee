// @ts-check
/**
 * The connection to the broker: socket, hello, reconnects, heartbeat, clock, token refresh,
 * and requests with their replies.
 * @module tablelock/connection
 */

/** @typedef {import("./types.js").Role} Role */
/** @typedef {import("./types.js").Locale} Locale */
/** @typedef {import("./types.js").Terminal} Terminal */
/** @typedef {import("./types.js").StoreConfig} StoreConfig */
/** @typedef {import("./types.js").HelloResult} HelloResult */
/** @typedef {import("./types.js").EventFrame} EventFrame */
/** @typedef {import("./types.js").Order} Order */

import { CLOSE, CONFIG_DEFAULTS } from "./constants.js";
import { makeError, prompt, TablelockError } from "./errors.js";
import { compact, deferred, event, localNow, noop, peekClaims, routedUrl } from "./helpers.js";
import {
  CONNECTION_CLOSED, CONNECTION_DOWN, CONNECTION_FAILED, CONNECTION_UP, EVENT_FRAME,
  FETCH_TIMEOUT_MS, GENERATION, SET_CONFIG, SET_STALE,
} from "./internal.js";

export const VERSION = "0.1.0";
export const PROTOCOL_VERSION = 1;
export const SUBPROTOCOL = "tablelock.v1";
// The close code this client gives a socket it abandons itself (a timeout, reconnect()).
const CLOSE_ABANDONED = 4000;

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
 * One terminal's connection to the broker: it says hello, reconnects with backoff, keeps the
 * clock and the token, matches replies to requests and answers the broker's `order.fetch`.
 * {@link TablelockClient} builds on it through the hooks below (symbols of internal.js).
 */
export class TablelockConnection extends EventTarget {
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
  /** @returns {string|null} the broker session id of the current connection (each hello starts one) */
  get sessionId() { return this._sessionId; }
  /** @returns {HelloResult|null} the last hello result */
  get hello() { return this._hello; }
  /** @returns {Terminal|null} who this client is (from the token) */
  get terminal() { return this._hello ? this._hello.terminal : null; }
  /** @returns {Role|null} */
  get role() { return this.terminal?.role ?? this._claims?.role ?? null; }
  /** @returns {string|null} */
  get storeId() { return this._hello?.store.store_id ?? this._claims?.store ?? null; }
  /** @returns {string|null} the table of an `h5` terminal (from hello, else the token) */
  get tableId() { return this.terminal?.table_id ?? this._claims?.table ?? null; }
  /** @returns {string|null} the token in use (for the broker's HTTP API), once one was read */
  get token() { return this._token; }
  /** True once `close()` was called. */
  get closed() { return this._closedByUser; }
  /** @returns {TablelockError|null} the error that stopped the reconnects, if one did */
  get failure() { return this._fatal; }
  /** @returns {StoreConfig|null} the store config (from hello, kept current by `config.updated`) */
  get config() { return this._config; }
  /** @returns {Locale} the locale of the broker's messages */
  get locale() {
    return this.options.locale ?? this._config?.locale ?? /** @type {Locale} */ (CONFIG_DEFAULTS.locale);
  }
  /** Estimated `server clock - local clock`, in ms (from hello and pings, the best RTT wins). */
  get serverOffsetMs() { return this._offset; }
  /** The broker's clock now, in ms since the epoch: compare with `expires_at`. */
  serverNow() { return Math.round(localNow() + this._offset); }

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
      ws = new Impl(routedUrl(this.options.url, this._claims), [SUBPROTOCOL]);
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
      order_authority: this.options.orderAuthority || this._fetchHandler ? true : undefined,
    });
    const timer = setTimeout(() => {
      if (gen === this._gen) this._drop(CLOSE_ABANDONED, "hello timed out");
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
    this.dispatchEvent(event("open", { hello }));
    this[CONNECTION_UP]();
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
    if (code === CLOSE.UNSUPPORTED_PROTOCOL) {
      this._fatal ??= makeError("UNSUPPORTED_PROTOCOL", prompt("UNSUPPORTED_PROTOCOL", this.locale));
    } else if (code === CLOSE.AUTH_FAILED && !this._refreshable) {
      // A fixed token that was refused or has expired: only a new client (sign-in) helps.
      this._fatal ??= makeError("AUTH_FAILED", prompt("AUTH_FAILED", this.locale));
    } else if (code === CLOSE.POLICY) {
      this._attempt = Math.max(this._attempt, 4); // policy (rate or connection limit): back off
    }
    const willReconnect = !this._closedByUser && !this._fatal;
    this[CONNECTION_DOWN]();
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
    this[CONNECTION_FAILED](err);
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
   * ends (else the broker closes the socket with `AUTH_FAILED` when it expires). Without an argument the
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
    if (this._ws || this._connecting) this._drop(CLOSE_ABANDONED, "reconnect");
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
    if (this._ws || this._connecting) this._drop(1000, "client closed");
    this._ready.reject(makeError("DISCONNECTED", "the client was closed"));
    this[CONNECTION_CLOSED]();
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
        if (gen === this._gen && err.code === "TIMEOUT") this._drop(CLOSE_ABANDONED, "ping timed out");
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
      this[EVENT_FRAME](frame);
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

  // --- hooks: what the client on top does (TablelockClient overrides them) ----------------

  /** Hello succeeded (a first connection or a reconnect). */
  [CONNECTION_UP]() {}

  /** The socket went down (the client reconnects unless closed or failed). */
  [CONNECTION_DOWN]() {}

  /** A fatal error: no more reconnects. @param {TablelockError} _err */
  [CONNECTION_FAILED](_err) {}

  /** `close()` was called. */
  [CONNECTION_CLOSED]() {}

  /** An event frame. @param {EventFrame} _frame */
  [EVENT_FRAME](_frame) {}

  // --- what the client on top sets -------------------------------------------------------

  /** @param {boolean} stale */
  [SET_STALE](stale) {
    if (stale === this._stale) return;
    this._stale = stale;
    this.dispatchEvent(event("stale", { stale }));
  }

  /** @param {StoreConfig} config */
  [SET_CONFIG](config) {
    this._config = config;
    this.dispatchEvent(event("config", { config }));
  }

  /** @returns {number} */
  get [GENERATION]() { return this._gen; }

  // --- the broker's rpc --------------------------------------------------------------------

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
  [FETCH_TIMEOUT_MS]() {
    return Math.max(this._requestTimeoutMs, (this._config?.erp_fetch_timeout_ms ?? CONFIG_DEFAULTS.erp_fetch_timeout_ms) + 5000);
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

  /** Wait until connected (or reject with a `DisconnectedError` after `timeoutMs`). */
  whenConnected(/** @type {number} */ timeoutMs) {
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
