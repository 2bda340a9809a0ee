// @ts-check
/**
 * Small helpers shared by the SDK's modules: clocks, promises, events, channel names.
 * @module tablelock/helpers
 */

import { CAPABILITIES } from "./constants.js";

/** @typedef {import("./types.js").Role} Role */

export const noop = () => {};

/** A monotonic "now" in epoch ms (does not jump with the wall clock). */
export function localNow() {
  const perf = globalThis.performance;
  return perf && perf.timeOrigin ? perf.timeOrigin + perf.now() : Date.now();
}

/**
 * @template T
 * @returns {{promise: Promise<T>, resolve: (value: T) => void, reject: (reason: unknown) => void}}
 */
export function deferred() {
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
export function event(name, detail) {
  return new CustomEvent(name, { detail });
}

/** Drop `undefined` values so that optional params are simply absent on the wire. */
export function compact(/** @type {Record<string, unknown>} */ params) {
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

/**
 * `url` with the token's store as `store=` (unless it names one already), so that a load
 * balancer can keep a store's terminals on one broker (docs/deploy); the broker ignores it.
 * @param {string} url
 * @param {{store?: unknown}|null} claims
 */
export function routedUrl(url, claims) {
  const store = claims?.store;
  if (typeof store !== "string") return url;
  const routed = new URL(url, globalThis.location?.href);
  if (routed.searchParams.has("store")) return url;
  routed.searchParams.set("store", store);
  return routed.toString();
}

/** The claims of a JWT, read without verifying it (only to know the store before hello). */
export function peekClaims(/** @type {string} */ token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(part + "===".slice((part.length + 3) % 4));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))));
  } catch {
    return null;
  }
}

/**
 * What the broker's capability table (CAPABILITIES) says of `role`: the SDK asks it instead of
 * comparing role names. Undefined for a role this SDK does not know (or no role yet).
 * @param {Role|null} role
 * @param {string} name e.g. `renew`, `record_payment`, `disconnect_grace`
 * @returns {any}
 */
export function capability(role, name) {
  const caps = role === null ? undefined : /** @type {Record<string, any>} */ (CAPABILITIES)[role];
  return caps?.[name];
}

/**
 * One terminal's connection to the broker. An `EventTarget`; its events (all `CustomEvent`s):
 *
 * - `open` `{hello}`: hello succeeded (first connection or a reconnect).
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
