// @ts-check
/**
 * The seams between the SDK's modules: each symbol names a member that one module's objects
 * call on another module's objects. `tablelock.js` does not export them, so applications never
 * see them; a module's `_underscore` members stay its own (tests/test_sdk_seams.py checks).
 * @module tablelock/internal
 */

// TablelockConnection calls these on the client built on it (connection.js → client.js).
/** Hello succeeded (a first connection or a reconnect). */
export const CONNECTION_UP = Symbol("connectionUp");
/** The socket went down (the client reconnects unless closed or failed). */
export const CONNECTION_DOWN = Symbol("connectionDown");
/** A fatal error: no more reconnects. `(err)` */
export const CONNECTION_FAILED = Symbol("connectionFailed");
/** `close()` was called. */
export const CONNECTION_CLOSED = Symbol("connectionClosed");
/** An event frame arrived. `(frame)` */
export const EVENT_FRAME = Symbol("eventFrame");

// The client on top sets these on its connection (client.js → connection.js).
/** `(stale)`: set `stale`, telling listeners when it changes. */
export const SET_STALE = Symbol("setStale");
/** `(config)`: the store's config changed (`config.updated`). */
export const SET_CONFIG = Symbol("setConfig");
/** `()`: a timeout long enough for a request that may wait on the ERP (`order.fetch`). */
export const FETCH_TIMEOUT_MS = Symbol("fetchTimeoutMs");
/** Getter: bumped whenever a socket is abandoned; a reply from an older one is ignored. */
export const GENERATION = Symbol("generation");

// ChannelMirror calls these on the client (mirror.js → client.js).
/** `(frame, replayed)`: an event in order goes to the lock handles, then the listeners. */
export const DELIVER = Symbol("deliver");
/** `(mirror)`: after a snapshot, end the handles whose lock is not in it. */
export const VERIFY_HANDLES = Symbol("verifyHandles");
/** `()`: recompute the client's `stale`. */
export const UPDATE_STALE = Symbol("updateStale");

// LockHandle calls these on the client (lock.js → client.js).
/** `(channel)`: keep mirroring a channel while a held lock watches it. */
export const WATCH = Symbol("watch");
/** `(channel)`: a held lock stopped watching the channel. */
export const UNWATCH = Symbol("unwatch");
/** `(handle)`: the handle ended; the client no longer holds it. */
export const FORGET_HANDLE = Symbol("forgetHandle");

// The client calls these on its mirrors (client.js → mirror.js).
/** `(reason)`: (re)subscribe; `reason` is `subscribe`, `reconnect` or `gap`. */
export const SUBSCRIBE = Symbol("subscribe");
/** `()`: the socket went down: wait for the re-subscribe. */
export const MIRROR_DOWN = Symbol("mirrorDown");
/** `(err)`: the broker refused the subscription, or the client failed for good. */
export const MIRROR_FAILED = Symbol("mirrorFailed");
/** `()`: stop for good. */
export const MIRROR_CLOSED = Symbol("mirrorClosed");
/** `(frame)`: an event on the mirror's channel (applied once it is in order). */
export const MIRROR_EVENT = Symbol("mirrorEvent");
/** Getter: true once a snapshot has been applied (a later re-sync makes the mirror stale). */
export const SYNCED = Symbol("synced");
/** Field: the application subscribed to the channel itself. */
export const USER_REF = Symbol("userRef");
/** Field: how many held locks watch the channel. */
export const WATCHERS = Symbol("watchers");

// The client calls these on its lock handles (client.js → lock.js).
/** `()`: the handle was registered: watch its channel and schedule the renewal. */
export const START = Symbol("start");
/** `(lock)`: the broker showed the lock again (same token). */
export const UPDATE_LOCK = Symbol("updateLock");
/** `()`: (re)schedule the renewal. */
export const SCHEDULE_RENEW = Symbol("scheduleRenew");
/** `()`: after a reconnect: renew now if the renewal fell due while the socket was down. */
export const RENEW_IF_DUE = Symbol("renewIfDue");
/** `()`: the client closed: renew no more. */
export const STOP_RENEWING = Symbol("stopRenewing");
/** `(reason, frame)`: the lock ended (one of LOST_LOCK_REASONS). */
export const END = Symbol("end");
/** Field: this client is releasing the lock, so a `released` is not a loss. */
export const RELEASING = Symbol("releasing");
