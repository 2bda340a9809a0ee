// An ERP cashier terminal to play by hand: see a table's order, edit the cart under the order
// lock, go to the cashier (payment lock, force-continue), print a pre-bill (presettle lock),
// accept a scanned order. As erp_main it also keeps the order book and answers order.fetch.
import { FIRST_AUTHORITY } from "/sdk/tablelock.js";
import {
  MENU, applyI18n, baseTables, bindConnection, clock, dialog, dishName, esc, itemInfo, kindLabel,
  money, onLangChange, openClient, params, paymentRef, reasonText, roleLabel, sayText, saidOf,
  setupLangSwitch, sortTables, TILL_ROLES, isPhone, statusLabel, t, tableModel, toast, tokenSource, whoLabel,
} from "./common.js";

// The till this page is: the one `?role=` names, else one the broker does not ask for an order
// first. The first one keeps the order book: it answers order.fetch and opens new orders.
const asked = params.get("role") ?? "";
const role = TILL_ROLES.includes(asked) ? asked : TILL_ROLES.find((r) => r !== FIRST_AUTHORITY) ?? asked;
const isMain = role === FIRST_AUTHORITY;
// Each page is a till of its own (the simulated store's tills are erp-front-desk, erp-cashier-2
// and erp-bar): a random id, kept by the tab across reloads so that its locks are its own.
const tabKey = `tablelock-erp-${role}`;
const suffix = sessionStorage.getItem(tabKey) ?? Math.random().toString(36).slice(2, 6).toUpperCase();
sessionStorage.setItem(tabKey, suffix);
const sub = params.get("sub") ?? `erp-page-${suffix.toLowerCase()}`;
const name = params.get("name") ?? `POS ${suffix}`;

applyI18n();
setupLangSwitch();

/** The ERP's own order book (erp_main): what it answers order.fetch with. */
const book = new Map();
/** order_id -> when the book last got a new version (a table's latest order wins a fetch). */
const bookTs = new Map();
const answerFetch = /** @type {HTMLInputElement} */ (document.getElementById("answer-fetch"));

const client = openClient({
  token: tokenSource({ role, sub, name }),
  ...(isMain ? { onOrderFetch: fetchFromBook } : {}),
});
window.tablelockClient = client;

/** @type {import("/sdk/tablelock.js").ChannelMirror|null} */
let store = null;
let selected = params.get("table") ?? "T01";
/** @type {string|null} the order shown, when the table has several */
let selectedOrder = null;
/** Cart edits under the order lock: sku -> qty delta (applied to the latest order on "place"). */
let cart = /** @type {{orderId: string, delta: Map<string, number>}|null} */ (null);

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));

// --- order book and order.fetch (erp_main) ----------------------------------------------------

/** @param {any} order */
function remember(order) {
  const had = book.get(order.order_id);
  if (!had || had.version < order.version) bookTs.set(order.order_id, Date.now());
  if (!had || had.version <= order.version) book.set(order.order_id, order);
}

/** @param {{order_id?: string, table_id?: string}} p */
function fetchFromBook(p) {
  if (!answerFetch.checked) {
    log(t("erp.fetch_off", { table: p.table_id ?? tableOf(p.order_id ?? "") }));
    throw Object.assign(new Error("the ERP is offline (demo switch)"), { code: "UNAVAILABLE" });
  }
  let order = p.order_id ? book.get(p.order_id) : null;
  if (!order && p.table_id) {
    const open = [...book.values()].filter((o) => o.table_id === p.table_id && (o.status ?? "open") === "open");
    order = open.sort((a, b) => (bookTs.get(b.order_id) ?? 0) - (bookTs.get(a.order_id) ?? 0))[0] ?? null;
  }
  if (order) log(t("erp.answered", { table: order.table_id }));
  return order ?? null;
}

// --- helpers -----------------------------------------------------------------------------------

/** @type {{said: import("./common.js").Said, tone: string}|null} what the message line says */
let note = null;

/** The message line; kept as a code or text function, so a language switch says it again. */
function message(/** @type {import("./common.js").Said|null} */ said, tone = "info") {
  note = said ? { said, tone } : null;
  const el = $("message");
  el.textContent = said ? sayText(said) : "";
  el.className = `message ${tone === "info" ? "" : tone}`;
  el.hidden = !said;
}

/** @param {string} text */
function log(text) {
  const li = document.createElement("li");
  li.textContent = `${clock(Date.now())}  ${text}`;
  $("log").prepend(li);
  while ($("log").children.length > 80) $("log").lastElementChild?.remove();
}

function isStale() {
  return document.body.classList.contains("is-stale");
}

/** @param {string} orderId @param {string} kind */
function myHandle(orderId, kind) {
  const h = client.handles.get(`${orderId}/${kind}`);
  return h && h.held ? h : null;
}

function tableOf(/** @type {string} */ orderId) {
  return store?.orders.get(orderId)?.table_id ?? book.get(orderId)?.table_id ?? orderId;
}

/** The open orders of the selected table, and the one shown. */
function current() {
  const orders = store ? [...store.orders.values()].filter((o) => o.table_id === selected) : [];
  orders.sort((a, b) => String(a.order_id).localeCompare(String(b.order_id)));
  let order = orders.find((o) => o.order_id === selectedOrder) ?? orders[0] ?? null;
  // Keep showing an order this terminal holds a lock on, even if it just got paid.
  if (!order && selectedOrder && [...client.handles.values()].some((h) => h.orderId === selectedOrder && h.held)) {
    order = book.get(selectedOrder) ?? null;
  }
  return { orders, order };
}

// --- rendering -----------------------------------------------------------------------------------

function render() {
  renderTables();
  renderOrder();
  renderMode();
}

function renderTables() {
  const model = store ? tableModel(store, new Map()) : new Map(baseTables().map((id) => [id, { table: id, state: "free", orders: [], locks: [] }]));
  const ids = sortTables([...model.keys()]);
  const mine = new Set([...client.handles.values()].filter((h) => h.held).map((h) => tableOf(h.orderId)));
  const html = ids.map((id) => {
    const entry = model.get(id);
    return `<button type="button" class="erp-table" data-table="${esc(id)}" data-testid="erp-table-${esc(id)}"
        data-state="${esc(entry.state)}" aria-pressed="${id === selected}">
      ${mine.has(id) ? `<span class="mine" title="${esc(t("erp.you_hold"))}"></span>` : ""}
      <b>${esc(id)}</b><small>${esc(t(`state.${entry.state}`))}</small></button>`;
  }).join("");
  if ($("tables").innerHTML !== html) $("tables").innerHTML = html;
}

function renderOrder() {
  const panel = $("order-panel");
  const { orders, order } = current();
  const stale = isStale();
  const dis = stale ? "disabled" : "";
  if (!order) {
    panel.innerHTML = `<div class="order-head"><h2>${esc(selected)}</h2></div>
      <p class="muted" data-testid="erp-no-order">${esc(t("erp.no_order", { table: selected }))}</p>
      ${isMain ? `<div class="actions"><button type="button" class="btn btn-primary" data-action data-do="new" data-testid="new-order" ${dis}>${esc(t("erp.new_order", { table: selected }))}</button></div>` : ""}`;
    return;
  }
  selectedOrder = order.order_id;
  const locks = store ? store.locksOf(order.order_id) : [];
  const chips = locks.length ? locks.map((l) => {
    const mine = l.holder.terminal_id === client.terminal?.terminal_id;
    return `<span class="chip ${mine ? "mine" : ""}" data-kind="${esc(l.kind)}" data-testid="erp-lock-${esc(l.kind)}">${esc(kindLabel(l.kind))} · ${esc(mine ? t("erp.you_hold") : whoLabel(l.holder))}</span>`;
  }).join("") : `<span class="chip">${esc(t("erp.locks.none"))}</span>`;
  const items = (order.items ?? []).map((it) => {
    const info = itemInfo(it);
    return `<li><span>${esc(info.name)}<span class="qty">×${esc(info.qty)}</span></span><span>${info.price === null ? "" : esc(money(info.price * info.qty))}</span></li>`;
  }).join("") || `<li class="muted">${esc(t("erp.items.none"))}</li>`;
  const tabs = orders.length > 1 ? `<div class="actions">${orders.map((o) => `<button type="button" class="btn btn-xs" data-pick-order="${esc(o.order_id)}" aria-pressed="${o.order_id === order.order_id}">${esc(o.order_id)}</button>`).join("")}</div>` : "";
  const mode = myHandle(order.order_id, "payment") ? "payment" : myHandle(order.order_id, "order") ? "order" : "";
  // A phone's payment lock is never forced from the cart: editing waits until it ends.
  const phonePaying = locks.some((l) => l.kind === "payment" && isPhone(l.holder.role));
  panel.innerHTML = `
    <div class="order-head">
      <h2>${esc(selected)} · ${esc(t("erp.order", { order: order.order_id }))}</h2>
      <span class="muted">${esc(t("erp.version", { version: order.version }))} · <span data-testid="erp-status">${esc(statusLabel(order.status))}</span></span>
    </div>
    ${tabs}
    <ul class="items" data-testid="erp-items">${items}</ul>
    <div class="order-head"><span>${esc(t("erp.total"))}</span><span class="order-total" data-testid="erp-total">${esc(money(order.amount_cents))}</span></div>
    <div class="lock-chips">${chips}</div>
    ${phonePaying ? `<p class="muted" data-testid="edit-cart-reason">${esc(t("erp.edit.phone_paying"))}</p>` : ""}
    <div class="actions">
      <button type="button" class="btn" data-action data-do="edit" data-testid="edit-cart" ${dis} ${mode || phonePaying ? "disabled data-off" : ""} ${phonePaying ? `title="${esc(t("erp.edit.phone_paying"))}"` : ""}>${esc(t("erp.edit"))}</button>
      <button type="button" class="btn btn-primary" data-action data-do="checkout" data-testid="checkout" ${dis} ${mode === "payment" ? "disabled data-off" : ""}>${esc(t("erp.checkout"))}</button>
      <button type="button" class="btn" data-action data-do="presettle" data-testid="presettle" ${dis} ${myHandle(order.order_id, "presettle") ? "disabled data-off" : ""}>${esc(t("erp.presettle"))}</button>
      <button type="button" class="btn" data-action data-do="accept" data-testid="accept" ${dis}>${esc(t("erp.accept"))}</button>
      ${isMain ? `<button type="button" class="btn" data-action data-do="new" data-testid="new-order" ${dis}>${esc(t("erp.new_order", { table: selected }))}</button>` : ""}
    </div>`;
}

function renderMode() {
  const panel = $("mode-panel");
  const { order } = current();
  const stale = isStale();
  const dis = stale ? "disabled" : "";
  if (!order) {
    panel.hidden = true;
    return;
  }
  const pay = myHandle(order.order_id, "payment");
  const edit = myHandle(order.order_id, "order");
  const pre = myHandle(order.order_id, "presettle");
  if (pay) {
    const toPay = pay.order && pay.order.version >= order.version ? pay.order : order;
    panel.setAttribute("data-state", "paying");
    panel.innerHTML = `<h2>${esc(t("erp.cashier"))}</h2>
      <p class="order-total">${esc(money(toPay.amount_cents))} <small class="muted">v${esc(toPay.version)}</small></p>
      ${pre ? `<p class="muted">${esc(t("erp.prebilled", { amount: money(order.amount_cents), version: pre.orderVersion }))}</p>` : ""}
      <div class="actions">
        <button type="button" class="btn btn-primary btn-lg" data-action data-do="collect" data-testid="collect" ${dis}>${esc(t("erp.collect", { amount: money(toPay.amount_cents) }))}</button>
        <button type="button" class="btn" data-action data-do="cancel-payment" data-testid="cancel-payment" ${dis}>${esc(t("erp.cancel_payment"))}</button>
      </div>`;
    panel.hidden = false;
    return;
  }
  if (edit) {
    if (!cart || cart.orderId !== order.order_id) cart = { orderId: order.order_id, delta: new Map() };
    const rows = cartItems(order).map((it) => `
      <div class="cart-row"><span>${esc(it.name)}</span>
        <button type="button" class="btn btn-xs" data-action data-cart="-" data-sku="${esc(it.sku)}" data-testid="cart-minus-${esc(it.sku)}" ${dis}>−</button>
        <b>${esc(it.qty)}</b>
        <button type="button" class="btn btn-xs" data-action data-cart="+" data-sku="${esc(it.sku)}" data-testid="cart-plus-${esc(it.sku)}" ${dis}>+</button>
      </div>`).join("");
    const menu = Object.keys(MENU).map((sku) => `<button type="button" class="btn btn-xs" data-action data-cart="+" data-sku="${esc(sku)}" data-testid="menu-${esc(sku)}" ${dis}><span>${esc(dishName(sku))}</span><span class="muted">${esc(money(MENU[sku][2]))}</span></button>`).join("");
    panel.setAttribute("data-state", "editing");
    panel.innerHTML = `<h2>${esc(t("erp.cart"))}</h2>
      ${rows}
      <p class="order-head"><span>${esc(t("erp.total"))}</span><span class="order-total" data-testid="cart-total">${esc(money(cartAmount(order)))}</span></p>
      <h3>${esc(t("erp.menu"))}</h3>
      <div class="menu">${menu}</div>
      <div class="actions">
        <button type="button" class="btn btn-primary" data-action data-do="place" data-testid="place-order" ${dis}>${esc(t("erp.place"))}</button>
        <button type="button" class="btn" data-action data-do="cancel-edit" data-testid="cancel-edit" ${dis}>${esc(t("erp.cancel_edit"))}</button>
      </div>`;
    panel.hidden = false;
    return;
  }
  if (pre) {
    panel.setAttribute("data-state", "prebilled");
    panel.innerHTML = `<h2>${esc(kindLabel("presettle"))}</h2>
      <p>${esc(t("erp.prebilled", { amount: money(order.amount_cents), version: pre.orderVersion }))}</p>
      <div class="actions"><button type="button" class="btn" data-action data-do="cancel-presettle" data-testid="cancel-presettle" ${dis}>${esc(t("erp.cancel_presettle"))}</button></div>`;
    panel.hidden = false;
    return;
  }
  panel.hidden = true;
  cart = null;
}

/**
 * An order's items by sku, with `delta` (sku -> qty change) applied; rows at 0 are dropped.
 * @param {any[]} items @param {Map<string, number>|null|undefined} delta
 */
function rowsOf(items, delta) {
  /** @type {Map<string, {sku: string, name: string, qty: number, price: number|null, raw: any}>} */
  const rows = new Map();
  for (const it of items ?? []) {
    const info = itemInfo(it);
    const had = rows.get(info.sku);
    if (had) had.qty += info.qty;
    else rows.set(info.sku, { ...info, raw: it });
  }
  for (const [sku, d] of delta ?? []) {
    const row = rows.get(sku);
    if (row) row.qty = Math.max(0, row.qty + d);
    else if (d > 0) rows.set(sku, { sku, name: dishName(sku), qty: d, price: MENU[sku]?.[2] ?? null, raw: null });
  }
  return [...rows.values()].filter((r) => r.qty > 0);
}

/** The latest order's items with the cart's changes. @param {any} order */
function cartItems(order) {
  return rowsOf(order.items, cart?.delta);
}

/** The order's amount changed by the cart (dishes of unknown price count as 0). @param {any} order */
function cartAmount(order) {
  const base = new Map(rowsOf(order.items, null).map((r) => [r.sku, r]));
  const now = new Map(cartItems(order).map((r) => [r.sku, r]));
  let amount = order.amount_cents;
  for (const sku of new Set([...base.keys(), ...now.keys()])) {
    const row = /** @type {any} */ (now.get(sku) ?? base.get(sku));
    amount += ((now.get(sku)?.qty ?? 0) - (base.get(sku)?.qty ?? 0)) * (row.price ?? 0);
  }
  return Math.max(0, amount);
}

// --- lock handles --------------------------------------------------------------------------------

/** Follow a handle: losses and contention are told; any end re-renders. @param {any} handle */
function follow(handle) {
  const table = tableOf(handle.orderId);
  handle.lost.then((/** @type {any} */ end) => {
    const kind = kindLabel(handle.kind);
    const said = { fn: () => {
      const kind = kindLabel(handle.kind);
      if (end.reason === "forced") return t("erp.lost.forced", { table, kind, by: whoLabel(end.event?.by) });
      if (end.reason === "expired") return t("erp.lost.expired", { table, kind });
      return t("erp.lost.other", { table, kind, reason: end.reason });
    } };
    message(said, "error");
    toast(sayText(said), "warn");
    log(sayText(said));
  });
  handle.addEventListener("contended", (/** @type {any} */ e) => {
    const text = t("erp.contended", {
      by: whoLabel(e.detail.by), table, kind: kindLabel(handle.kind),
      action: t(`erp.action.${e.detail.action}`),
    });
    toast(text, "info");
    log(text);
  });
  handle.ended.then(() => render());
}

/**
 * Take a lock; a refusal an ERP may override shows the broker's prompt in a dialog (the seed's
 * force-continue for PAYMENT_LOCKED), and on confirm takes it by force.
 * @param {string} orderId @param {"order"|"payment"|"presettle"} kind @param {string} title
 */
async function acquire(orderId, kind, title) {
  try {
    const handle = await client.acquire(orderId, kind);
    follow(handle);
    return handle;
  } catch (err) {
    const e = /** @type {any} */ (err);
    if (!e.canForce) {
      message(saidOf(e), "error");
      log(`${title}: ${e.message ?? e}`);
      return null;
    }
    log(`${title}: ${e.message}`);
    const ok = await dialog({
      title, message: e.message, danger: true,
      confirm: kind === "payment" ? t("dialog.continue") : t("dialog.force"),
    });
    if (!ok) return null;
    try {
      const reason = reasonText(kind === "payment" ? "till_checkout" : "till_force");
      const handle = await client.acquire(orderId, kind, { force: true, operator: name, reason });
      follow(handle);
      for (const lock of handle.forced) {
        log(t("feed.forced", { by: name, table: tableOf(lock.order_id), kind: kindLabel(lock.kind), who: whoLabel(lock.holder) }));
      }
      return handle;
    } catch (err2) {
      message(saidOf(err2), "error");
      return null;
    }
  }
}

// --- actions --------------------------------------------------------------------------------------

document.addEventListener("click", async (ev) => {
  const target = /** @type {HTMLElement} */ (ev.target);
  const tableBtn = target.closest("[data-table]");
  if (tableBtn && tableBtn.classList.contains("erp-table")) {
    selected = /** @type {string} */ (tableBtn.getAttribute("data-table"));
    selectedOrder = null;
    message(null);
    params.set("table", selected);
    history.replaceState(null, "", `${location.pathname}?${params}${location.hash}`);
    render();
    return;
  }
  const pick = target.closest("[data-pick-order]");
  if (pick) {
    selectedOrder = pick.getAttribute("data-pick-order");
    render();
    return;
  }
  const cartBtn = target.closest("[data-cart]");
  if (cartBtn instanceof HTMLButtonElement && cart && !cartBtn.disabled) {
    const sku = /** @type {string} */ (cartBtn.getAttribute("data-sku"));
    const d = cartBtn.getAttribute("data-cart") === "+" ? 1 : -1;
    const { order } = current();
    const qty = order ? cartItems(order).find((r) => r.sku === sku)?.qty ?? 0 : 0;
    if (d < 0 && qty <= 0) return;
    cart.delta.set(sku, (cart.delta.get(sku) ?? 0) + d);
    renderMode();
    return;
  }
  const btn = target.closest("[data-do]");
  if (!(btn instanceof HTMLButtonElement) || btn.disabled) return;
  const what = btn.getAttribute("data-do");
  btn.disabled = true;
  try {
    await act(/** @type {string} */ (what));
  } finally {
    render();
  }
});

/** @param {string} what */
async function act(what) {
  const { order } = current();
  message(null);
  if (what === "new") return newOrder();
  if (!order) return;
  const id = order.order_id;
  if (what === "edit") {
    const handle = await acquire(id, "order", `${t("erp.edit")} · ${selected}`);
    if (handle) {
      cart = { orderId: id, delta: new Map() };
      log(`${t("erp.edit")} · ${selected}`);
    }
  } else if (what === "cancel-edit") {
    cart = null;
    await myHandle(id, "order")?.release();
  } else if (what === "place") {
    await placeOrder(order);
  } else if (what === "checkout") {
    const handle = await acquire(id, "payment", `${t("erp.checkout")} · ${selected}`);
    if (handle) log(`${t("erp.checkout")} · ${selected} · ${money(handle.order?.amount_cents ?? order.amount_cents)}`);
  } else if (what === "cancel-payment") {
    await myHandle(id, "payment")?.release();
  } else if (what === "collect") {
    await collect(order);
  } else if (what === "presettle") {
    const handle = await acquire(id, "presettle", `${t("erp.presettle")} · ${selected}`);
    if (handle) {
      const vars = { amount: money(handle.order?.amount_cents ?? order.amount_cents), version: handle.orderVersion };
      message({ key: "erp.prebilled", vars }, "ok");
      log(t("erp.prebilled", vars));
    }
  } else if (what === "cancel-presettle") {
    await myHandle(id, "presettle")?.release();
  } else if (what === "accept") {
    try {
      const r = await client.check(id, "accept");
      if (r.allowed) {
        toast(t("erp.accepted"), "ok");
        log(`${t("erp.accept")} · ${selected}: ✓`);
      } else {
        toast(/** @type {string} */ (r.message), "warn");
        log(`${t("erp.accept")} · ${selected}: ${r.message}`);
      }
    } catch (err) {
      message(saidOf(err), "error");
    }
  }
}

async function newOrder() {
  const skus = Object.keys(MENU);
  const picks = [skus[Math.floor(Math.random() * 4)], "rice", skus[4 + Math.floor(Math.random() * 4)]];
  /** @type {Map<string, number>} */
  const counts = new Map();
  for (const sku of picks) counts.set(sku, (counts.get(sku) ?? 0) + 1);
  const items = [...counts].map(([sku, qty]) => ({ sku, name: MENU[sku][0], qty, price_cents: MENU[sku][2] }));
  const order = {
    order_id: `${selected}-${Date.now().toString(36)}`,
    table_id: selected, version: 1, status: "open", items,
    amount_cents: items.reduce((n, it) => n + it.qty * it.price_cents, 0),
  };
  try {
    const stored = await client.publishOrder(order, "add_items");
    remember(stored);
    selectedOrder = stored.order_id;
    const text = t("erp.new_order.done", { table: selected, order: stored.order_id });
    toast(text, "ok");
    log(text);
  } catch (err) {
    message(saidOf(err), "error");
  }
}

/** "Place order": publish the cart on the latest order under the order lock, then release. @param {any} order */
async function placeOrder(order) {
  const handle = myHandle(order.order_id, "order");
  if (!handle || !cart) return;
  const items = cartItems(order).map((r) => r.raw && itemInfo(r.raw).qty === r.qty ? r.raw
    : { ...(r.raw ?? {}), sku: r.sku, name: r.raw?.name ?? MENU[r.sku]?.[0] ?? r.sku, qty: r.qty, ...(r.price === null ? {} : { price_cents: r.price }) });
  const next = { ...order, items, amount_cents: cartAmount(order), version: order.version + 1 };
  try {
    const stored = await client.publishOrder(next, "modify", { token: handle.token ?? undefined });
    remember(stored);
    cart = null;
    await handle.release();
    const vars = { version: stored.version, amount: money(stored.amount_cents) };
    message({ key: "erp.placed", vars }, "ok");
    log(`${selected}: ${t("erp.placed", vars)}`);
  } catch (err) {
    message(saidOf(err), "error");
    log(`${t("erp.place")}: ${/** @type {any} */ (err).message}`);
  }
}

/** Take the money under the payment lock. @param {any} order */
async function collect(order) {
  const handle = myHandle(order.order_id, "payment");
  if (!handle) return;
  const toPay = handle.order && handle.order.version >= order.version ? handle.order : order;
  const ref = paymentRef(`pos-${sub}`);
  try {
    const result = await client.completePayment({
      orderId: order.order_id, token: handle.token, version: toPay.version,
      amountCents: toPay.amount_cents, paymentRef: ref,
    });
    remember(result.order);
    const vars = { table: order.table_id, amount: money(toPay.amount_cents), ref };
    message({ key: "erp.paid", vars }, "ok");
    toast(t("erp.paid", vars), "ok");
    log(t("erp.paid", vars));
  } catch (err) {
    message(saidOf(err), "error");
    log(`${t("erp.collect", { amount: money(toPay.amount_cents) })}: ${/** @type {any} */ (err).message}`);
  }
}

// --- start ----------------------------------------------------------------------------------------

function renderWho() {
  const me = client.terminal;
  $("who").textContent = me ? `${me.name} · ${roleLabel(me.role)}` : `${name} · ${roleLabel(role)}`;
}

async function start() {
  $("fetch-toggle").hidden = !isMain;
  await client.ready;
  renderWho();
  store = await client.subscribeStore();
  store.addEventListener("change", (e) => {
    const frame = /** @type {CustomEvent} */ (e).detail.event;
    if (isMain && store) {
      for (const o of store.orders.values()) remember(o);
      if (frame?.order) remember(frame.order);
    }
    render();
  });
  if (isMain) for (const o of store.orders.values()) remember(o);
  render();
}

bindConnection(client, render);
client.addEventListener("open", renderWho);
onLangChange(() => {
  if (note) message(note.said, note.tone);
  renderWho();
  render();
});
render();
renderWho();
start().catch((err) => {
  console.error(err);
  message(saidOf(err), "error");
});
