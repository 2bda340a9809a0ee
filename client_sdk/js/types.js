// @ts-check
/**
 * The wire types of protocol v1, as JSDoc typedefs (no runtime code): import them with
 * `import("./types.js").Lock` and the like.
 * @module tablelock/types
 */

/** @typedef {import("./errors.js").TablelockError} TablelockError */

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

export {};
