// The customer's scan-to-order page of one table: its order, live (the order's channel, and the
// table feed for a new order), "add dish" (a request: the check says whether it would be
// allowed now), and pay: the SDK's pay() takes the payment lock, the payment app's confirm
// goes to the payment provider, and the broker's `order.paid` says it is done. A phone never
// records a payment itself. "Pay at the front desk" when the ERP cannot be reached.
import {
  MENU, applyI18n, bindConnection, currentToken, dishName, esc, itemInfo, locksRunDown, money, onLangChange,
  openClient, params, paymentRef, sayText, saidOf, setupLangSwitch, statusLabel, t, tokenSource,
  hashClaims, recordsForPhones,
} from "./common.js";

// The table: ?table=, else the one a #token= names (an h5 token is scoped to one table).
const table = params.get("table") ?? hashClaims()?.table ?? "T01";
const sub = params.get("sub") ?? `h5-${table}-${Math.random().toString(36).slice(2, 8)}`;

applyI18n();
setupLangSwitch();

const client = openClient({ token: tokenSource({ role: "h5", sub, table, name: params.get("name") ?? table }) });
window.tablelockClient = client;

/** @type {any} */
let order = null;
let loading = true;
let staleOrder = false;
/** @type {import("/sdk/tablelock.js").ChannelMirror|null} */
let mirror = null;
/** @type {import("/sdk/tablelock.js").PaymentSession|null} */
let session = null;
/** @type {string|null} the payment ref handed to the provider, until it is settled */
let confirming = null;
let stopCountdown = () => {};
/** @type {{ref: string, amount: number, orderId: string}|null} this phone paid */
let paidInfo = null;
/** @type {{orderId: string, by: string}|null} paid by someone else: "counter", "phone" or "" */
let paidElsewhere = null;
/** @type {{said: import("./common.js").Said, tone: string}|null} */
let note = null;
/** @type {import("./common.js").Said|null} */
let frontDesk = null;

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));

function isStale() {
  return document.body.classList.contains("is-stale");
}

/** What the page says; kept as a code or key, so a language switch says it again. */
function message(/** @type {import("./common.js").Said|null} */ said, tone = "info") {
  note = said ? { said, tone } : null;
  const el = $("message");
  el.textContent = said ? sayText(said) : "";
  el.className = `message ${tone === "info" ? "" : tone}`;
  el.hidden = !said;
}

// --- the order ------------------------------------------------------------------------------------

/** The table's order: fresh from the ERP; if that fails, the broker's copy (marked as such). */
async function loadOrder(fresh = true) {
  loading = !order;
  render();
  try {
    const r = await client.getOrder({ tableId: table, fresh });
    staleOrder = false;
    await setOrder(r.order);
  } catch (err) {
    const e = /** @type {any} */ (err);
    if (fresh && e.code === "ERP_UNAVAILABLE") {
      try {
        const r = await client.getOrder({ tableId: table });
        staleOrder = true;
        await setOrder(r.order);
      } catch {
        await setOrder(null);
      }
    } else if (e.code === "NOT_FOUND") {
      await setOrder(null);
    } else {
      message(saidOf(e), "error");
    }
  } finally {
    loading = false;
    render();
  }
}

/** @param {any} next */
async function setOrder(next) {
  if (next && order && next.order_id !== order.order_id) {
    paidInfo = null; // a new party's order: the last one's receipt goes
    paidElsewhere = null;
    message(null);
  }
  order = next;
  if (!next) return;
  const channel = `order:${client.storeId}:${next.order_id}`;
  if (mirror?.channel === channel) return;
  mirror?.close();
  mirror = null;
  try {
    const mine = await client.subscribe(channel);
    mirror = mine;
    mine.addEventListener("change", (e) => {
      if (mirror !== mine) return;
      const frame = /** @type {CustomEvent} */ (e).detail.event;
      if (mine.order) order = mine.order;
      if (frame?.event === "order.paid") onPaid(frame);
      render();
    });
    if (mine.order) order = mine.order;
  } catch {
    // Not ours any more (moved to another table): the table feed brings the right one.
  }
  render();
}

/** The order is paid: by this phone (through the provider), at the counter, or elsewhere. */
function onPaid(/** @type {any} */ frame) {
  const ref = frame.payment?.payment_ref;
  if (confirming && ref === confirming) {
    paidInfo = { ref, amount: frame.payment.amount_cents, orderId: frame.order.order_id };
    confirming = null;
    session = null;
  } else if (!paidInfo) {
    const role = frame.payment?.by?.role ?? "";
    paidElsewhere = { orderId: frame.order.order_id, by: recordsForPhones(role) ? "phone" : role ? "counter" : "" };
    session = null;
    confirming = null;
  }
  message(null); // whatever was said about paying is over
}

/** The table feed: the scan-to-order platform says when the table's order changes. */
function followTable() {
  const token = currentToken(client);
  if (!token || typeof EventSource === "undefined") return;
  const feed = new EventSource(`/demo/tables/${encodeURIComponent(table)}/feed?token=${encodeURIComponent(token)}`);
  feed.addEventListener("message", (e) => {
    const notice = JSON.parse(e.data);
    if (!order || notice.order_id !== order.order_id || !mirror) loadOrder(false);
  });
}

// --- rendering ------------------------------------------------------------------------------------

/** The lock someone else holds that keeps this phone from paying now, if any. */
function blocking() {
  if (!mirror) return null;
  const me = client.terminal?.terminal_id;
  for (const kind of ["payment", "order"]) {
    const lock = mirror.lockOf(/** @type {any} */ (kind));
    if (lock && lock.holder.terminal_id !== me) return lock;
  }
  return null;
}

/** Why this phone cannot pay now, with the time left when the lock runs out (another phone's). */
function blockedBy() {
  const lock = blocking();
  if (!lock) return "";
  const left = locksRunDown(lock.holder.role) ? Math.ceil(Math.max(0, lock.expires_at - client.serverNow()) / 1000) : 0;
  return t(`h5.locked.${lock.kind}`) + (left ? t("h5.locked.left", { n: left }) : "");
}

function payButton() {
  const dis = isStale();
  if (session?.active) {
    const n = Math.ceil(session.msLeft() / 1000);
    return `<button type="button" class="btn btn-primary btn-lg btn-block" data-testid="pay" disabled data-paying>${esc(t("h5.paying", { n }))}</button>`;
  }
  const reason = blockedBy();
  return `<button type="button" class="btn btn-primary btn-lg btn-block" data-action data-do="pay" data-testid="pay" ${reason ? "data-off" : ""} ${dis || reason ? "disabled" : ""}>${esc(t("h5.pay", { amount: money(order.amount_cents) }))}</button>
    ${reason ? `<p class="muted pay-reason" data-testid="pay-reason">${esc(reason)}</p>` : ""}`;
}

function render() {
  $("title").textContent = t("h5.title", { table });
  const stale = isStale();
  const dis = stale ? "disabled" : "";
  const el = $("order");
  if (loading && !order) {
    el.innerHTML = `<p class="muted">${esc(t("h5.loading"))}</p>`;
  } else if (!order) {
    el.innerHTML = `<p class="muted" data-testid="h5-no-order">${esc(t("h5.no_order"))}</p>
      <div class="actions"><button type="button" class="btn" data-action data-do="refresh" data-testid="refresh" ${dis}>${esc(t("h5.refresh"))}</button></div>`;
  } else {
    const items = (order.items ?? []).map((it) => {
      const info = itemInfo(it);
      return `<li><span>${esc(info.name)}<span class="qty">×${esc(info.qty)}</span></span><span>${info.price === null ? "" : esc(money(info.price * info.qty))}</span></li>`;
    }).join("");
    const status = order.status ?? "open";
    const canPay = status === "open" && !paidInfo && !confirming;
    el.innerHTML = `
      <div class="order-head"><h2>${esc(t("h5.order"))}</h2><span class="chip" data-testid="h5-status" data-status="${esc(status)}">${esc(statusLabel(status))}</span></div>
      ${staleOrder ? `<p class="muted">${esc(t("h5.stale_order"))}</p>` : ""}
      <ul class="items" data-testid="h5-items">${items}</ul>
      <div class="order-head"><span>${esc(t("h5.total"))}</span><span class="order-total" data-testid="h5-total">${esc(money(order.amount_cents))}</span></div>
      <p class="muted"><small>${esc(order.order_id)} · v${esc(order.version)}</small></p>
      <div class="actions">
        ${canPay ? payButton() : ""}
        <button type="button" class="btn btn-block" data-action data-do="refresh" data-testid="refresh" ${dis}>${esc(t("h5.refresh"))}</button>
      </div>`;
  }
  renderPayApp();
  renderPaid();
  renderFrontDesk();
  renderDishes();
}

function renderPayApp() {
  const el = $("payapp");
  if (confirming) {
    el.hidden = false;
    el.innerHTML = `<h2>${esc(t("h5.payapp"))}</h2><p class="muted" data-testid="provider-wait">${esc(t("h5.provider.wait"))}</p>`;
    return;
  }
  if (!session || !session.active) {
    el.hidden = true;
    return;
  }
  const dis = isStale() ? "disabled" : "";
  el.hidden = false;
  el.innerHTML = `<h2>${esc(t("h5.payapp"))}</h2>
    <div class="countdown" data-testid="countdown" id="countdown"></div>
    <p class="muted" style="text-align:center" id="countdown-hint"></p>
    <div class="actions">
      <button type="button" class="btn btn-primary btn-lg btn-block" data-action data-do="confirm" data-testid="confirm-payment" ${dis}>${esc(t("h5.confirm", { amount: money(session.amountCents) }))}</button>
      <button type="button" class="btn btn-block" data-action data-do="cancel" data-testid="cancel-payment" ${dis}>${esc(t("h5.cancel"))}</button>
    </div>`;
  tickCountdown(session.msLeft());
}

function tickCountdown(/** @type {number} */ ms) {
  const s = Math.ceil(ms / 1000);
  const el = document.getElementById("countdown");
  if (el) {
    el.textContent = `${s}s`;
    el.setAttribute("data-ms", String(ms));
  }
  const hint = document.getElementById("countdown-hint");
  if (hint) hint.textContent = t("h5.payapp.hint", { n: s });
  const pay = document.querySelector("[data-testid=pay][data-paying]");
  if (pay) pay.textContent = t("h5.paying", { n: s });
}

function renderPaid() {
  const el = $("paid");
  const elsewhere = !paidInfo && paidElsewhere && order?.order_id === paidElsewhere.orderId ? paidElsewhere
    : !paidInfo && order && order.status === "paid" ? { by: "" } : null;
  el.hidden = !paidInfo && !elsewhere;
  if (paidInfo) {
    el.innerHTML = `<div class="big">✓</div><h2>${esc(t("h5.paid"))}</h2>
      <p class="order-total">${esc(money(paidInfo.amount))}</p>
      <p class="muted" data-testid="paid-ref">${esc(t("h5.paid.ref", { ref: paidInfo.ref }))}</p>`;
  } else if (elsewhere) {
    const key = elsewhere.by === "counter" ? "h5.paid.counter" : elsewhere.by === "phone" ? "h5.paid.other" : "h5.paid.elsewhere";
    el.innerHTML = `<div class="big">✓</div><h2 data-testid="paid-elsewhere" data-by="${esc(elsewhere.by)}">${esc(t(key))}</h2>
      <p class="order-total">${esc(money(order?.amount_cents))}</p>`;
  }
}

function renderFrontDesk() {
  const el = $("frontdesk");
  el.hidden = !frontDesk;
  if (frontDesk) {
    el.innerHTML = `<div class="big">🛎</div><h2>${esc(t("h5.frontdesk"))}</h2>
      <p data-testid="front-desk-message">${esc(sayText(frontDesk))}</p>
      <div class="actions"><button type="button" class="btn btn-block" data-do="back" data-testid="back">${esc(t("h5.back"))}</button></div>`;
  }
}

function renderDishes() {
  const dis = isStale() || !order || (order.status ?? "open") !== "open" ? "disabled" : "";
  const html = Object.keys(MENU).map((sku) => `<button type="button" class="btn" data-action data-add="${esc(sku)}" data-testid="add-${esc(sku)}" ${dis}>
      <span>${esc(dishName(sku))}</span><span class="muted">${esc(money(MENU[sku][2]))}</span></button>`).join("");
  $("dishes").innerHTML = html;
}

// --- actions -----------------------------------------------------------------------------------------

document.addEventListener("click", async (ev) => {
  const target = /** @type {HTMLElement} */ (ev.target);
  const add = target.closest("[data-add]");
  if (add instanceof HTMLButtonElement && !add.disabled) {
    await addDish(/** @type {string} */ (add.getAttribute("data-add")));
    return;
  }
  const btn = target.closest("[data-do]");
  if (!(btn instanceof HTMLButtonElement) || btn.disabled) return;
  btn.disabled = true;
  try {
    const what = btn.getAttribute("data-do");
    if (what === "refresh") {
      message(null);
      await loadOrder(true);
    } else if (what === "pay") await pay();
    else if (what === "confirm") await confirmPayment();
    else if (what === "cancel") {
      await session?.cancel().catch(() => {});
      session = null;
    } else if (what === "back") {
      frontDesk = null;
    }
  } finally {
    btn.disabled = false;
    render();
  }
});

/** A dish is added through the ERP: the page asks whether it would be allowed now. @param {string} sku */
async function addDish(sku) {
  if (!order) return;
  try {
    const r = await client.check(order.order_id, "add_items");
    if (r.allowed) message({ key: "h5.add.sent", vars: { dish: dishName(sku) } }, "ok");
    else message(saidOf(r.error, r.code === "PAYMENT_LOCKED" ? "h5" : ""), "error");
  } catch (err) {
    message(saidOf(err), "error");
  }
}

async function pay() {
  message(null);
  frontDesk = null;
  try {
    const s = await client.pay({ tableId: table });
    session = s;
    order = s.order ?? order;
    stopCountdown();
    stopCountdown = s.countdown((ms) => tickCountdown(ms), { intervalMs: 200 });
    s.lost.then((/** @type {any} */ end) => {
      if (session !== s) return;
      session = null;
      // While the provider confirms, its outcome says what happened to the money.
      if (!confirming) message({ code: end.reason === "expired" ? "LOCK_EXPIRED" : "FENCED" }, "error");
      render();
    });
    s.ended.then(() => {
      if (session === s && !s.active && !confirming) session = null;
      render();
    });
  } catch (err) {
    const e = /** @type {any} */ (err);
    if (e.payAtFrontDesk) frontDesk = { code: "ERP_UNAVAILABLE" };
    else message(saidOf(e, e.code === "PAYMENT_LOCKED" ? "h5" : ""), "error");
  }
  render();
}

/**
 * The payment app's confirm: the charge goes to the payment provider, whose payment service
 * records it at the broker. The broker's `order.paid` says it is done; the provider says so
 * when it could not be recorded (the money is then refunded).
 */
async function confirmPayment() {
  const s = session;
  if (!s || !s.active) return;
  const ref = paymentRef(`wx-${table}`);
  confirming = ref;
  render();
  const headers = { Authorization: `Bearer ${currentToken(client)}`, "Content-Type": "application/json" };
  try {
    const sent = await fetch("/demo/pay", { method: "POST", headers, body: JSON.stringify({ ...s.charge, payment_ref: ref }) });
    if (!sent.ok) throw new Error((await sent.json().catch(() => null))?.error?.message ?? `HTTP ${sent.status}`);
    /** @type {Promise<any>} the provider's word, once it has one */
    const outcome = fetch(`/demo/pay/${encodeURIComponent(ref)}?wait=1`, { headers }).then((r) => r.json());
    const refused = outcome.then((o) => (o.status === "paid" ? new Promise(() => {}) : o));
    // The lock lost first: the payment cannot be recorded, and the provider says so.
    const result = await Promise.race([s.confirmed.then((paid) => ({ status: "paid", paid })), refused])
      .catch(() => outcome);
    if (confirming !== ref) return; // said already (order.paid through the mirror)
    confirming = null;
    if (result.status === "paid") {
      paidInfo = { ref, amount: result.paid.payment?.amount_cents ?? s.amountCents, orderId: s.orderId };
      order = result.paid.order;
      session = null;
      message(null);
    } else if (result.status === "refused") {
      message({ key: "h5.provider.refused", vars: { reason: { code: result.code } } }, "error");
    } else if (result.status !== "pending") {
      message({ key: "h5.provider.unknown" }, "error");
    }
  } catch (err) {
    if (confirming === ref) confirming = null;
    message(saidOf(err), "error");
  }
}

// --- start ------------------------------------------------------------------------------------------

bindConnection(client, () => {
  render();
});
onLangChange(() => {
  if (note) message(note.said, note.tone);
  render();
});
render();
client.ready.then(() => {
  followTable();
  client.addEventListener("open", () => loadOrder(false)); // back after a drop: catch up
  return loadOrder(true);
}).catch((err) => message(saidOf(err), "error"));
// Lock countdowns of others (another phone's payment) tick on the broker's clock.
setInterval(() => {
  if (order && !session && locksRunDown(blocking()?.holder.role)) render();
}, 1000);
