// The store-manager dashboard: table map, terminals, live events, reconcile queue, manager
// actions (force release, store config), on a manager terminal of the browser SDK.
import {
  STATES, ago, applyI18n, baseTables, bindConnection, clock, currentToken, dialog, esc, flash,
  getLang, kindLabel, locksRunDown, money, onLangChange, openClient, params, prompt, reasonText, roleLabel,
  setupLangSwitch,
  sortTables, t, tableModel, toast, tokenSource, whoLabel,
} from "./common.js";

const PAID_SHOW_MS = 120_000; // a paid table shows "paid" this long (unless a new order opens)
const RECONCILE_POLL_MS = 4000;
const FEED_MAX = 300;
const RANGES = { // PROTOCOL.md section 1, in ms; the form shows seconds
  h5_ttl: { key: "h5_payment_lock_ttl_ms", min: 5000, max: 300000, label: "dash.config.h5_ttl" },
  grace: { key: "disconnect_grace_ms", min: 0, max: 600000, label: "dash.config.grace" },
};

applyI18n();
setupLangSwitch();

const client = openClient({
  token: tokenSource({ role: "manager", sub: params.get("sub") ?? "manager-1", name: params.get("name") ?? "Manager" }),
});
window.tablelockClient = client; // handy from the devtools console

/** @type {import("/sdk/tablelock.js").ChannelMirror|null} */
let store = null;
/** order_id -> the latest order seen (the store mirror forgets paid and closed ones). */
const knownOrders = new Map();
/** table -> {order, payment, ts}: recently paid. */
const paid = new Map();
/** terminal_id -> {terminal, online, ts} */
const terminals = new Map();
/** @type {Array<{id: number, ts: number, table: string|null, tone: string, replayed: boolean, text: () => string, key?: string}>} */
const feed = [];
let feedSeq = 0;
/** `${order_id}/${token}` -> {operator, reason}: forced releases' reasons, from the audit log */
const forceReasons = new Map();
/** table -> signature of its last render (a change flashes the tile) */
const tileSigs = new Map();
/** @type {any[]} */
let rejected = [];

const $ = (/** @type {string} */ sel) => /** @type {HTMLElement} */ (document.querySelector(sel));
const mapEl = $("#map");
const feedEl = $("#feed");
const filterEl = /** @type {HTMLSelectElement} */ ($("#feed-filter"));
const termEl = $("#terminals");
const recEl = $("#reconcile");
const form = /** @type {HTMLFormElement} */ ($("#config-form"));

function now() {
  return client.serverNow();
}

function tableOf(/** @type {string|null|undefined} */ orderId) {
  if (!orderId) return null;
  return knownOrders.get(orderId)?.table_id ?? store?.orders.get(orderId)?.table_id ?? null;
}

const tableText = (/** @type {string|null} */ table, /** @type {string|null|undefined} */ orderId) =>
  table ?? orderId ?? "?";

// --- HTTP API (manager) ---------------------------------------------------------------------

/**
 * @param {string} method
 * @param {string} path under /v1/stores/<store>
 * @param {unknown} [body]
 */
async function api(method, path, body) {
  const response = await fetch(`/v1/stores/${encodeURIComponent(client.storeId ?? "")}${path}`, {
    method,
    headers: {
      Authorization: `Bearer ${currentToken(client)}`,
      ...(body === undefined ? {} : { "Content-Type": "application/json" }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  return { status: response.status, ok: response.ok, data };
}

/** Orders the mirror no longer has (paid, closed): ask the broker once for their table. */
const asked = new Set();
async function resolveOrders(/** @type {Iterable<string|null|undefined>} */ ids) {
  const missing = [...new Set(ids)].filter((id) => id && !tableOf(id) && !asked.has(id));
  await Promise.all(missing.map(async (id) => {
    asked.add(/** @type {string} */ (id));
    const r = await api("GET", `/orders/${encodeURIComponent(/** @type {string} */ (id))}`).catch(() => null);
    if (r?.ok && r.data?.order) knownOrders.set(r.data.order.order_id, r.data.order);
  }));
  return missing.length > 0;
}

/** Tables paid a moment before this page opened (the store snapshot has open orders only). */
async function loadRecentPaid() {
  const r = await api("GET", "/audit?kind=payment.completed&limit=30").catch(() => null);
  if (!r?.ok) return;
  const cutoff = now() - PAID_SHOW_MS;
  const recent = r.data.entries.filter((e) => e.ts > cutoff);
  await resolveOrders(recent.map((e) => e.order_id));
  for (const e of [...recent].reverse()) {
    const order = knownOrders.get(e.order_id);
    if (!order) continue;
    const had = paid.get(order.table_id);
    if (had && had.ts >= e.ts) continue;
    paid.set(order.table_id, {
      order, ts: e.ts,
      payment: { amount_cents: e.detail?.amount_cents, payment_ref: e.detail?.payment_ref, by: e.terminal },
    });
  }
  renderMap();
}

// --- the store mirror ---------------------------------------------------------------------

async function start() {
  await client.ready;
  $("#store-label").textContent = t("dash.store", { store: client.storeId });
  store = await client.subscribeStore();
  store.addEventListener("change", (e) => onChange(/** @type {CustomEvent} */ (e).detail));
  onChange({ event: null, snapshot: true });
  fillConfig(client.config);
  client.addEventListener("config", (e) => onConfigEvent(/** @type {CustomEvent} */ (e).detail.config));
  client.addEventListener("open", () => {
    pollAudit();
    api("GET", "/config").then((r) => r.ok && fillConfig(r.data), () => {});
  });
  await loadRecentPaid();
  backfillFeed();
  pollAudit();
  setInterval(pollAudit, RECONCILE_POLL_MS);
  api("GET", "/config").then((r) => r.ok && fillConfig(r.data), () => {});
}

/** @param {{event: any, replayed?: boolean, snapshot?: boolean}} detail */
function onChange(detail) {
  if (!store) return;
  for (const order of store.orders.values()) knownOrders.set(order.order_id, order);
  const frame = detail.event;
  if (detail.snapshot) {
    const seen = new Set();
    for (const terminal of store.terminals.values()) {
      seen.add(terminal.terminal_id);
      const known = terminals.get(terminal.terminal_id);
      if (!known || !known.online) terminals.set(terminal.terminal_id, { terminal, online: true, ts: now() });
    }
    for (const [id, known] of terminals) {
      if (known.online && !seen.has(id)) terminals.set(id, { ...known, online: false, ts: now() });
    }
  }
  if (frame) {
    if (frame.order) knownOrders.set(frame.order.order_id, frame.order);
    if (frame.event === "order.paid" && frame.order) {
      paid.set(frame.order.table_id, { order: frame.order, payment: frame.payment, ts: frame.ts });
    }
    if (frame.event === "terminal.online" && frame.terminal) {
      terminals.set(frame.terminal.terminal_id, { terminal: frame.terminal, online: true, ts: frame.ts });
    }
    if (frame.event === "terminal.offline" && frame.terminal) {
      terminals.set(frame.terminal.terminal_id, { terminal: frame.terminal, online: false, ts: frame.ts });
    }
    addEventToFeed(frame, Boolean(detail.replayed));
    if (["order.paid", "lock.expired", "lock.forced"].includes(frame.event)) pollAuditSoon();
  }
  renderAll();
}

// --- rendering ------------------------------------------------------------------------------

function renderAll() {
  renderLegend();
  renderMap();
  renderTerminals();
  renderFeedFilter();
}

function renderLegend() {
  const el = $("#legend");
  const html = STATES.map((s) => `<li data-state="${s}"><i></i>${esc(t(`state.${s}`))}</li>`).join("");
  if (el.innerHTML !== html) el.innerHTML = html;
}

function isStale() {
  return document.body.classList.contains("is-stale");
}

function renderMap() {
  if (!store) {
    if (!mapEl.children.length) {
      mapEl.innerHTML = baseTables().map((id) => `<article class="tile" data-testid="table-${esc(id)}" data-state="free"><div class="tile-head"><span class="tile-name">${esc(id)}</span></div></article>`).join("");
    }
    return;
  }
  const cutoff = now() - PAID_SHOW_MS;
  for (const [table, info] of paid) if (info.ts < cutoff) paid.delete(table);
  const model = tableModel(store, paid);
  const ids = sortTables([...model.keys()]);
  const stale = isStale();
  const lang = getLang();
  for (const id of ids) {
    const entry = /** @type {any} */ (model.get(id));
    const sig = JSON.stringify([entry.state, entry.orders.map((o) => [o.order_id, o.version, o.amount_cents]),
      entry.locks.map((l) => [l.kind, l.token]), entry.paid?.ts ?? 0, stale, lang]);
    let tile = mapEl.querySelector(`[data-table="${CSS.escape(id)}"]`);
    const placeholder = mapEl.querySelector(`[data-testid="table-${CSS.escape(id)}"]:not([data-table])`);
    placeholder?.remove();
    if (!tile) {
      tile = document.createElement("article");
      tile.className = "tile";
      tile.setAttribute("data-table", id);
      tile.setAttribute("data-testid", `table-${id}`);
      mapEl.append(tile);
    }
    if (tileSigs.get(id) === sig) continue;
    const before = tileSigs.get(id);
    tileSigs.set(id, sig);
    tile.setAttribute("data-state", entry.state);
    tile.innerHTML = tileHtml(entry, stale);
    // A real change (not a language switch or a staleness flip) flashes the tile.
    if (before !== undefined && JSON.parse(before).slice(0, 4).join() !== JSON.parse(sig).slice(0, 4).join()) {
      flash(tile);
    }
  }
  // Keep the tiles in order (a table first seen later is inserted in place).
  const order = ids.map((id) => mapEl.querySelector(`[data-table="${CSS.escape(id)}"]`));
  order.forEach((el, i) => {
    if (el && mapEl.children[i] !== el) mapEl.insertBefore(el, mapEl.children[i] ?? null);
  });
  tick();
}

/** @param {any} entry @param {boolean} stale */
function tileHtml(entry, stale) {
  const id = entry.table;
  const orders = entry.orders;
  let orderLine = "";
  if (orders.length) {
    const o = orders[0];
    const count = Array.isArray(o.items) ? o.items.reduce((n, it) => n + (typeof it?.qty === "number" ? it.qty : 1), 0) : 0;
    orderLine = `<div class="tile-order"><span class="amount">${esc(money(o.amount_cents))}</span>
      <span class="muted">v${esc(o.version)} · ${esc(t("dash.order.items", { n: count }))}</span>
      ${orders.length > 1 ? `<span class="muted">· ${esc(t("dash.order.more", { n: orders.length - 1 }))}</span>` : ""}
      <span class="order-id" title="${esc(o.order_id)}">${esc(o.order_id)}</span></div>`;
  } else if (entry.state === "paid" && entry.paid) {
    orderLine = `<div class="tile-order"><span class="muted" data-paid-ts="${entry.paid.ts}">${esc(t("dash.paid.at", { amount: money(entry.paid.payment?.amount_cents ?? entry.paid.order?.amount_cents), when: ago(entry.paid.ts, now()) }))}</span></div>`;
  }
  const locks = entry.locks.map((lock) => {
    const runsDown = locksRunDown(lock.holder?.role); // a phone's lock: its countdown matters
    const total = Math.max(1, lock.expires_at - lock.acquired_at);
    return `<li class="tile-lock" data-kind="${esc(lock.kind)}" data-testid="lock-${esc(id)}-${esc(lock.kind)}">
      <div class="lock-line"><span class="lock-kind">${esc(kindLabel(lock.kind))}</span>
        <button type="button" class="btn btn-xs btn-ghost-danger" data-action data-force
          data-order="${esc(lock.order_id)}" data-kind="${esc(lock.kind)}" data-token="${esc(lock.token)}"
          data-testid="force-release-${esc(id)}-${esc(lock.kind)}" ${stale ? "disabled" : ""}>${esc(t("dash.force"))}</button></div>
      <div class="lock-line"><span class="lock-holder" title="${esc(lock.holder?.terminal_id)}">${esc(whoLabel(lock.holder))}</span>
        <span class="lock-since" data-since="${lock.acquired_at}">${esc(ago(lock.acquired_at, now()))}</span></div>
      ${runsDown ? `<div class="ttl-row"><div class="ttl-bar"><i data-bar-expires="${lock.expires_at}" data-bar-total="${total}"></i></div>
        <span class="ttl" data-testid="ttl-${esc(id)}" data-expires="${lock.expires_at}"></span></div>` : ""}
    </li>`;
  }).join("");
  return `<div class="tile-head"><span class="tile-name">${esc(id)}</span>
      <span class="tile-badge">${esc(t(`state.${entry.state}`))}</span></div>
    ${orderLine}
    ${locks ? `<ul class="tile-locks">${locks}</ul>` : ""}`;
}

/** Relative times and countdowns, on the broker's clock. */
function tick() {
  const n = now();
  for (const el of document.querySelectorAll("[data-since]")) {
    el.textContent = ago(Number(el.getAttribute("data-since")), n);
  }
  for (const el of document.querySelectorAll("[data-expires]")) {
    const left = Number(el.getAttribute("data-expires")) - n;
    el.textContent = left > 0 ? t("time.left", { n: Math.ceil(left / 1000) }) : t("time.expired");
    el.classList.toggle("urgent", left < 5000);
  }
  for (const el of document.querySelectorAll("[data-bar-expires]")) {
    const left = Math.max(0, Number(el.getAttribute("data-bar-expires")) - n);
    const total = Number(el.getAttribute("data-bar-total"));
    /** @type {HTMLElement} */ (el).style.width = `${Math.min(100, (100 * left) / total).toFixed(1)}%`;
  }
  for (const el of document.querySelectorAll("[data-offline-ts]")) {
    el.textContent = t("dash.terminal.offline", { when: ago(Number(el.getAttribute("data-offline-ts")), n) });
  }
  if (paid.size) {
    const cutoff = n - PAID_SHOW_MS;
    if ([...paid.values()].some((p) => p.ts < cutoff)) renderMap();
  }
}
setInterval(tick, 250);

function renderTerminals() {
  const self = client.terminal?.terminal_id;
  const list = [...terminals.values()].sort((a, b) =>
    Number(b.online) - Number(a.online) ||
    String(a.terminal.role).localeCompare(String(b.terminal.role)) ||
    String(a.terminal.name).localeCompare(String(b.terminal.name)));
  $("#term-count").textContent = `${list.filter((x) => x.online).length}/${list.length}`;
  const html = list.length ? list.map(({ terminal, online, ts }) => `
    <li class="terminal" data-testid="terminal-${esc(terminal.terminal_id)}" data-online="${online}" data-role="${esc(terminal.role)}">
      <span class="dot" aria-hidden="true"></span>
      <span class="terminal-name">${esc(terminal.name)}${terminal.terminal_id === self ? ` <em class="muted">· ${esc(t("dash.terminal.self"))}</em>` : ""}</span>
      <span class="terminal-role">${esc(roleLabel(terminal.role))}${terminal.table_id ? ` · ${esc(terminal.table_id)}` : ""}</span>
      <span class="terminal-state">${online ? esc(t("dash.terminal.online")) : `<span data-offline-ts="${ts}">${esc(t("dash.terminal.offline", { when: ago(ts, now()) }))}</span>`}</span>
    </li>`).join("") : `<li class="empty">${esc(t("dash.terminals.none"))}</li>`;
  if (termEl.innerHTML !== html) termEl.innerHTML = html;
}

// --- the event feed -------------------------------------------------------------------------

/** @param {any} frame @param {boolean} replayed */
function addEventToFeed(frame, replayed) {
  const lock = frame.lock;
  const table = frame.order?.table_id ?? tableOf(lock?.order_id);
  const tbl = tableText(table, lock?.order_id ?? frame.order?.order_id);
  const kind = lock ? lock.kind : "";
  /** @type {() => string} */
  let text;
  let tone = "normal";
  const who = () => whoLabel(lock?.holder);
  switch (frame.event) {
    case "lock.acquired":
      tone = `lock-${kind}`;
      text = () => t("feed.acquired", { who: who(), table: tbl, kind: kindLabel(kind) });
      break;
    case "lock.released":
      if (frame.reason === "upgraded") text = () => t("feed.upgraded", { who: who(), table: tbl });
      else if (frame.reason === "paid") return; // "T03 paid ¥..." says it
      else if (frame.reason === "holder_disconnected") {
        tone = "warn";
        text = () => t("feed.disconnected", { who: who(), table: tbl, kind: kindLabel(kind) });
      } else text = () => t("feed.released", { who: who(), table: tbl, kind: kindLabel(kind) });
      break;
    case "lock.expired":
      tone = "expired";
      text = () => t("feed.expired", { who: who(), table: tbl, kind: kindLabel(kind) });
      break;
    case "lock.forced": {
      tone = "forced";
      const key = `${lock?.order_id}/${lock?.token}`;
      text = () => {
        const base = t("feed.forced", { by: whoLabel(frame.by), table: tbl, kind: kindLabel(kind), who: who() });
        const why = forceReasons.get(key);
        return why?.reason ? `${base}${getLang() === "en" ? ": " : "："}${reasonText(why.reason)}` : base;
      };
      break;
    }
    case "order.updated": {
      const o = frame.order;
      if (o.status === "closed") text = () => t("feed.order.closed", { table: tbl, order: o.order_id });
      else if (o.version === 1) text = () => t("feed.order.new", { table: tbl, order: o.order_id, amount: money(o.amount_cents) });
      else text = () => t("feed.order.updated", { table: tbl, order: o.order_id, version: o.version, amount: money(o.amount_cents) });
      break;
    }
    case "order.paid":
      tone = "paid";
      text = () => t("feed.order.paid", {
        table: tbl, amount: money(frame.payment?.amount_cents ?? frame.order?.amount_cents),
        by: whoLabel(frame.payment?.by), ref: frame.payment?.payment_ref ?? "",
      });
      break;
    case "terminal.online":
      tone = "muted";
      text = () => t("feed.online", { who: whoLabel(frame.terminal) });
      break;
    case "terminal.offline":
      tone = "muted";
      text = () => t("feed.offline", { who: whoLabel(frame.terminal) });
      break;
    case "config.updated":
      text = () => t("feed.config");
      break;
    case "lock.contended":
      tone = "warn";
      text = () => t("feed.contended", { by: whoLabel(frame.by), table: tbl, kind: kindLabel(kind) });
      break;
    default:
      text = () => frame.event;
  }
  pushFeed({ ts: frame.ts, table, tone, replayed, text, event: frame.event });
}

/** @param {{ts: number, table: string|null, tone: string, replayed: boolean, text: () => string, event: string}} entry */
function pushFeed(entry, atEnd = false) {
  const item = { id: ++feedSeq, ...entry };
  if (atEnd) feed.push(item);
  else feed.unshift(item);
  if (feed.length > FEED_MAX) feed.length = FEED_MAX;
  const el = feedItem(item);
  if (atEnd) feedEl.append(el);
  else feedEl.prepend(el);
  while (feedEl.children.length > FEED_MAX) feedEl.lastElementChild?.remove();
  feedEl.querySelector(".empty")?.remove();
  applyFilter();
}

/** @param {any} item */
function feedItem(item) {
  const li = document.createElement("li");
  li.className = `feed-item tone-${item.tone}`;
  li.setAttribute("data-feed-id", String(item.id));
  li.setAttribute("data-event", item.event);
  li.setAttribute("data-table", item.table ?? "");
  li.innerHTML = feedInner(item);
  if (!item.replayed && !item.backfill) li.classList.add("new");
  return li;
}

/** @param {any} item */
function feedInner(item) {
  return `<time datetime="${new Date(item.ts).toISOString()}">${esc(clock(item.ts))}</time>
    ${item.table ? `<span class="feed-table">${esc(item.table)}</span>` : `<span class="feed-table none"></span>`}
    <span class="feed-text">${esc(item.text())}</span>
    ${item.replayed ? `<span class="tag">${esc(t("feed.replayed"))}</span>` : ""}`;
}

function rerenderFeed() {
  for (const item of feed) {
    const li = feedEl.querySelector(`[data-feed-id="${item.id}"]`);
    if (li) li.innerHTML = feedInner(item);
  }
  if (!feed.length) feedEl.innerHTML = `<li class="empty">${esc(t("dash.feed.empty"))}</li>`;
}

function renderFeedFilter() {
  const tables = new Set(baseTables());
  if (store) for (const o of store.orders.values()) tables.add(o.table_id);
  for (const item of feed) if (item.table) tables.add(item.table);
  const current = filterEl.value;
  const options = [["", t("dash.feed.all")], ...sortTables([...tables]).map((id) => [id, id])];
  const html = options.map(([v, label]) => `<option value="${esc(v)}">${esc(label)}</option>`).join("");
  if (filterEl.getAttribute("data-html") !== html) {
    filterEl.innerHTML = html;
    filterEl.setAttribute("data-html", html);
    filterEl.value = current;
  }
}

function applyFilter() {
  const table = filterEl.value;
  for (const li of feedEl.children) {
    const own = li.getAttribute("data-table");
    /** @type {HTMLElement} */ (li).hidden = Boolean(table) && own !== table;
  }
}
filterEl.addEventListener("change", applyFilter);

/** The last entries of the audit log, so that a freshly opened dashboard has some history. */
async function backfillFeed() {
  const r = await api("GET", "/audit?limit=40").catch(() => null);
  if (!r?.ok) return;
  const entries = [...r.data.entries].reverse(); // oldest first
  await resolveOrders(entries.map((e) => e.order_id));
  const shown = [];
  for (const e of entries) {
    const d = e.detail ?? {};
    const table = tableOf(e.order_id);
    const tbl = tableText(table, e.order_id);
    /** @type {(() => string)|null} */
    let text = null;
    let tone = "normal";
    if (e.kind === "lock.acquired") text = () => t("feed.acquired", { who: whoLabel(e.terminal), table: tbl, kind: kindLabel(d.kind) });
    else if (e.kind === "lock.released") {
      if (d.reason === "paid") continue; // "T03 paid ¥..." says it
      const key = d.reason === "upgraded" ? "feed.upgraded"
        : d.reason === "holder_disconnected" ? "feed.disconnected" : "feed.released";
      if (d.reason === "holder_disconnected") tone = "warn";
      text = () => t(key, { who: whoLabel(e.terminal), table: tbl, kind: kindLabel(d.kind) });
    }
    else if (e.kind === "lock.expired") {
      tone = "expired";
      text = () => t("feed.expired", { who: whoLabel(e.terminal), table: tbl, kind: kindLabel(d.kind) });
    } else if (e.kind === "lock.forced") {
      tone = "forced";
      text = () => t("feed.audit.forced", { by: d.operator || whoLabel(e.terminal), table: tbl, kind: kindLabel(d.kind), who: whoLabel(d.holder), reason: reasonText(d.reason) || "—" });
    } else if (e.kind === "payment.completed") {
      tone = "paid";
      text = () => t("feed.audit.completed", { table: tbl, amount: money(d.amount_cents), ref: d.payment_ref });
    } else if (e.kind === "payment.rejected") {
      tone = "warn";
      text = () => t("feed.audit.rejected", { table: tbl, code: d.code, ref: d.payment_ref });
    }
    if (text) shown.push({ ts: e.ts, table, tone, replayed: false, text, event: e.kind, backfill: true });
  }
  // Older than whatever arrived live meanwhile: append below it.
  for (const entry of shown.reverse()) pushFeed(entry, true);
  if (!feed.length) rerenderFeed();
}

// --- reconcile queue ------------------------------------------------------------------------

let pollTimer = /** @type {any} */ (null);
function pollAuditSoon() {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(pollAudit, 150);
}

let polling = false;
async function pollAudit() {
  if (polling || !client.storeId) return;
  polling = true;
  try {
    const [rej, forced] = await Promise.all([
      api("GET", "/audit?kind=payment.rejected&limit=200"),
      api("GET", "/audit?kind=lock.forced&limit=50"),
    ]);
    if (rej.ok) {
      rejected = rej.data.entries.filter((e) => e.handled === false);
      await resolveOrders(rejected.map((e) => e.order_id));
      renderReconcile();
    }
    if (forced.ok) {
      let fresh = false;
      for (const e of forced.data.entries) {
        const key = `${e.order_id}/${e.detail?.token}`;
        if (!forceReasons.has(key)) {
          forceReasons.set(key, { operator: e.detail?.operator, reason: e.detail?.reason });
          fresh = true;
        }
      }
      if (fresh) rerenderFeed();
    }
  } catch {
    // the broker is down: the stale banner says so; the next poll tries again
  } finally {
    polling = false;
  }
}

function renderReconcile() {
  $("#rec-count").textContent = String(rejected.length);
  $("#rec-count").classList.toggle("hot", rejected.length > 0);
  const stale = isStale();
  const html = rejected.length ? rejected.map((e) => {
    const d = e.detail ?? {};
    const table = tableOf(e.order_id);
    return `<li class="rec-item" data-testid="reconcile-${esc(e.id)}" data-id="${esc(e.id)}">
      <div class="rec-top"><span class="rec-ref" title="${esc(t("dash.reconcile.ref"))}">${esc(d.payment_ref)}</span>
        <span class="code" title="${esc(prompt(d.code, getLang()))}">${esc(d.code)}</span></div>
      <dl class="rec-grid">
        <dt>${esc(t("dash.reconcile.amount"))}</dt><dd>${esc(money(d.amount_cents))}</dd>
        <dt>${esc(t("dash.reconcile.version"))}</dt><dd>v${esc(d.version)}</dd>
        <dt>${esc(t("dash.reconcile.order"))}</dt><dd>${esc(table ? `${table} · ${e.order_id}` : e.order_id)}</dd>
        <dt>${esc(t("dash.reconcile.by"))}</dt><dd>${esc(whoLabel(e.terminal))}</dd>
      </dl>
      <div class="rec-foot"><time>${esc(clock(e.ts))}</time>
        <button type="button" class="btn btn-xs" data-action data-handle="${esc(e.id)}"
          data-testid="reconcile-handle-${esc(e.id)}" ${stale ? "disabled" : ""}>${esc(t("dash.reconcile.handle"))}</button></div>
    </li>`;
  }).join("") : `<li class="empty">${esc(t("dash.reconcile.empty"))}</li>`;
  if (recEl.innerHTML !== html) recEl.innerHTML = html;
}

recEl.addEventListener("click", async (e) => {
  const button = /** @type {HTMLElement} */ (e.target).closest("[data-handle]");
  if (!(button instanceof HTMLButtonElement) || button.disabled) return;
  button.disabled = true;
  const id = button.getAttribute("data-handle");
  const r = await api("POST", `/audit/${encodeURIComponent(id ?? "")}/handled`).catch((err) => ({ ok: false, data: null, status: 0, err }));
  if (!r.ok) {
    toast(t("dash.reconcile.failed", { message: r.data?.error?.message ?? `HTTP ${r.status}` }), "error");
    button.disabled = false;
    return;
  }
  rejected = rejected.filter((x) => x.id !== id);
  renderReconcile();
  pollAuditSoon();
});

// --- force release --------------------------------------------------------------------------

mapEl.addEventListener("click", async (e) => {
  const button = /** @type {HTMLElement} */ (e.target).closest("[data-force]");
  if (!(button instanceof HTMLButtonElement) || button.disabled || !store) return;
  const orderId = /** @type {string} */ (button.getAttribute("data-order"));
  const kind = /** @type {any} */ (button.getAttribute("data-kind"));
  const lock = store.lock(orderId, kind);
  if (!lock) return;
  const table = tableText(tableOf(orderId), orderId);
  const operator = client.terminal?.name ?? "manager";
  const done = await dialog({
    title: t("dash.force.title", { table, kind: kindLabel(kind) }),
    body: t("dash.force.body", { holder: whoLabel(lock.holder), since: ago(lock.acquired_at, now()) }),
    danger: true,
    confirm: t("dash.force.confirm"),
    fields: [
      { name: "operator", label: t("dash.force.operator"), value: operator, readonly: true },
      { name: "reason", label: t("dash.force.reason"), placeholder: t("dash.force.reason.placeholder"), multiline: true },
    ],
    validate: (v) => (v.reason.trim() ? null : t("dash.force.reason.required")),
    submit: async (v) => {
      try {
        await client.release(orderId, kind, { force: true, operator, reason: v.reason.trim() });
        forceReasons.set(`${orderId}/${lock.token}`, { operator, reason: v.reason.trim() });
        return null;
      } catch (err) {
        return /** @type {any} */ (err).message;
      }
    },
  });
  if (done) {
    toast(t("dash.force.done", { table, kind: kindLabel(kind) }), "ok");
    rerenderFeed();
    pollAuditSoon();
  }
});

// --- store config ---------------------------------------------------------------------------

let saving = false;
/** @type {any} */
let shownConfig = null;

/** @param {any} config */
function fillConfig(config) {
  if (!config) return;
  shownConfig = config;
  const f = /** @type {any} */ (form.elements);
  f.strong_link.checked = Boolean(config.strong_link);
  f.h5_ttl.value = String(config.h5_payment_lock_ttl_ms / 1000);
  f.grace.value = String(config.disconnect_grace_ms / 1000);
  for (const el of form.querySelectorAll("[data-error]")) /** @type {HTMLElement} */ (el).hidden = true;
  renderRanges();
}

function renderRanges() {
  for (const [name, r] of Object.entries(RANGES)) {
    const el = form.querySelector(`[data-range="${name}"]`);
    if (el) el.textContent = t("dash.config.range", { min: r.min / 1000, max: r.max / 1000 });
    const input = /** @type {HTMLInputElement} */ (form.elements.namedItem(name));
    input.min = String(r.min / 1000);
    input.max = String(r.max / 1000);
  }
}

/** @param {any} config */
function onConfigEvent(config) {
  const mine = saving;
  fillConfig(config);
  if (!mine) status(t("dash.config.refreshed"));
}

function status(text, tone = "") {
  const el = $("[data-testid=config-status]");
  el.textContent = text;
  el.className = `form-note ${tone}`;
}

/** Client-side checks with the ranges of PROTOCOL.md section 1. @returns {Record<string, number>|null} */
function readForm() {
  const f = /** @type {any} */ (form.elements);
  /** @type {Record<string, any>} */
  const patch = { strong_link: f.strong_link.checked };
  let ok = true;
  for (const [name, r] of Object.entries(RANGES)) {
    const input = /** @type {HTMLInputElement} */ (f[name]);
    const err = /** @type {HTMLElement} */ (form.querySelector(`[data-error="${name}"]`));
    const raw = input.value.trim();
    const seconds = Number(raw);
    let problem = "";
    if (raw === "" || !Number.isFinite(seconds)) problem = t("dash.config.number", { field: t(r.label) });
    else if (seconds * 1000 < r.min || seconds * 1000 > r.max) {
      problem = t("dash.config.invalid", { field: t(r.label), min: r.min / 1000, max: r.max / 1000 });
    }
    err.textContent = problem;
    err.hidden = !problem;
    input.setAttribute("aria-invalid", problem ? "true" : "false");
    if (problem) ok = false;
    else patch[r.key] = Math.round(seconds * 1000);
  }
  return ok ? patch : null;
}

form.addEventListener("input", () => {
  status("");
  $("[data-testid=config-error]").hidden = true;
});

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  const errorEl = $("[data-testid=config-error]");
  errorEl.hidden = true;
  const patch = readForm();
  if (!patch) return;
  if (shownConfig?.strong_link && patch.strong_link === false) {
    const sure = await dialog({
      title: t("dash.config.off.title"), body: t("dash.config.off.body"), danger: true,
      confirm: t("dash.config.save"),
    });
    if (!sure) return;
  }
  saving = true;
  try {
    const r = await api("PUT", "/config", patch);
    if (r.ok) {
      fillConfig(r.data);
      status(t("dash.config.saved"), "ok");
    } else {
      errorEl.textContent = t("dash.config.server", { message: r.data?.error?.message ?? `HTTP ${r.status}` });
      errorEl.hidden = false;
    }
  } catch (err) {
    errorEl.textContent = t("dash.config.server", { message: String(/** @type {any} */ (err)?.message ?? err) });
    errorEl.hidden = false;
  } finally {
    // config.updated may come right after the reply: it is ours.
    setTimeout(() => { saving = false; }, 500);
  }
});

// --- language -------------------------------------------------------------------------------

onLangChange(() => {
  if (client.storeId) $("#store-label").textContent = t("dash.store", { store: client.storeId });
  renderWho();
  renderAll();
  rerenderFeed();
  renderReconcile();
  renderRanges();
  refreshConnection();
});

function renderWho() {
  const me = client.terminal;
  $("#who").textContent = me ? t("dash.you", { name: me.name, role: roleLabel(me.role) }) : "";
}
client.addEventListener("open", renderWho);

const refreshConnection = bindConnection(client, () => {
  renderAll();
  renderReconcile();
});
renderAll();
rerenderFeed();
renderReconcile();
renderRanges();
start().catch((err) => {
  console.error(err);
  toast(String(err?.message ?? err), "error", 15000);
});
