// The customer's scan-to-order page of one table: its order (fresh from the ERP), "add dish"
// (a request: the check says whether it would be allowed now), and pay with the SDK's pay()
// helper: payment lock, countdown on the broker's clock, the payment app's confirm, and
// "pay at the front desk" when the ERP cannot be reached.
import {
  MENU, applyI18n, bindConnection, dishName, esc, itemInfo, money, onLangChange, openClient,
  params, paymentRef, prompt, setupLangSwitch, t, tokenSource, getLang, hashClaims,
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
let stopCountdown = () => {};
/** @type {{ref: string, amount: number}|null} */
let paidInfo = null;
/** @type {{text: string, tone: string}|null} */
let note = null;
let frontDesk = "";

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));

function isStale() {
  return document.body.classList.contains("is-stale");
}

/** @param {string} text @param {"info"|"ok"|"error"} [tone] */
function message(text, tone = "info") {
  note = text ? { text, tone } : null;
  const el = $("message");
  el.textContent = text;
  el.className = `message ${tone === "info" ? "" : tone}`;
  el.hidden = !text;
}

// --- the order ------------------------------------------------------------------------------------

/** The table's order: fresh from the ERP; if that fails, the broker's copy (marked as such). */
async function loadOrder(fresh = true) {
  loading = !order;
  render();
  try {
    const r = await client.getOrder({ tableId: table, fresh });
    staleOrder = false;
    setOrder(r.order);
  } catch (err) {
    const e = /** @type {any} */ (err);
    if (fresh && e.code === "ERP_UNAVAILABLE") {
      try {
        const r = await client.getOrder({ tableId: table });
        staleOrder = true;
        setOrder(r.order);
      } catch {
        setOrder(null);
      }
    } else if (e.code === "NOT_FOUND") {
      setOrder(null);
    } else {
      message(e.message ?? String(e), "error");
    }
  } finally {
    loading = false;
    render();
  }
}

/** @param {any} next */
async function setOrder(next) {
  order = next;
  if (!next) return;
  const channel = `order:${client.storeId}:${next.order_id}`;
  if (mirror?.channel === channel) return;
  mirror?.close();
  mirror = null;
  try {
    mirror = await client.subscribe(channel);
    mirror.addEventListener("change", () => {
      if (mirror?.order) order = mirror.order;
      render();
    });
    if (mirror.order) order = mirror.order;
  } catch {
    // Not ours any more (moved to another table): the next refresh finds the right one.
  }
  render();
}

// --- rendering ------------------------------------------------------------------------------------

function lockNote() {
  if (!mirror) return "";
  for (const kind of ["payment", "presettle", "order"]) {
    const lock = mirror.lockOf(/** @type {any} */ (kind));
    if (lock && lock.holder.terminal_id !== client.terminal?.terminal_id) return t(`h5.locked.${kind}`);
  }
  return "";
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
    const locked = lockNote();
    const canPay = status === "open" && !session && !paidInfo;
    el.innerHTML = `
      <div class="order-head"><h2>${esc(t("h5.order"))}</h2><span class="chip" data-testid="h5-status">${esc(t(`h5.status.${status}`))}</span></div>
      ${staleOrder ? `<p class="muted">${esc(t("h5.stale_order"))}</p>` : ""}
      <ul class="items">${items}</ul>
      <div class="order-head"><span>${esc(t("h5.total"))}</span><span class="order-total" data-testid="h5-total">${esc(money(order.amount_cents))}</span></div>
      <p class="muted"><small>${esc(order.order_id)} · v${esc(order.version)}</small></p>
      ${locked ? `<p><span class="chip" data-kind="payment" data-testid="h5-lock-note">${esc(locked)}</span></p>` : ""}
      <div class="actions">
        ${canPay ? `<button type="button" class="btn btn-primary btn-lg btn-block" data-action data-do="pay" data-testid="pay" ${dis}>${esc(t("h5.pay", { amount: money(order.amount_cents) }))}</button>` : ""}
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
  const el = document.getElementById("countdown");
  if (!el) return;
  const s = Math.ceil(ms / 1000);
  el.textContent = `${s}s`;
  el.setAttribute("data-ms", String(ms));
  const hint = document.getElementById("countdown-hint");
  if (hint) hint.textContent = t("h5.payapp.hint", { n: s });
}

function renderPaid() {
  const el = $("paid");
  el.hidden = !paidInfo;
  if (paidInfo) {
    el.innerHTML = `<div class="big">✓</div><h2>${esc(t("h5.paid"))}</h2>
      <p class="order-total">${esc(money(paidInfo.amount))}</p>
      <p class="muted" data-testid="paid-ref">${esc(t("h5.paid.ref", { ref: paidInfo.ref }))}</p>`;
  }
}

function renderFrontDesk() {
  const el = $("frontdesk");
  el.hidden = !frontDesk;
  if (frontDesk) {
    el.innerHTML = `<div class="big">🛎</div><h2>${esc(t("h5.frontdesk"))}</h2>
      <p data-testid="front-desk-message">${esc(frontDesk)}</p>
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
      message("");
      await loadOrder(true);
    } else if (what === "pay") await pay();
    else if (what === "confirm") await confirmPayment();
    else if (what === "cancel") {
      await session?.cancel().catch(() => {});
      session = null;
    } else if (what === "back") {
      frontDesk = "";
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
    if (r.allowed) message(t("h5.add.sent", { dish: dishName(sku) }), "ok");
    else message(/** @type {string} */ (r.message), "error");
  } catch (err) {
    message(/** @type {any} */ (err).message ?? String(err), "error");
  }
}

async function pay() {
  message("");
  frontDesk = "";
  try {
    const s = await client.pay({ tableId: table });
    session = s;
    order = s.order ?? order;
    stopCountdown();
    stopCountdown = s.countdown((ms) => tickCountdown(ms), { intervalMs: 200 });
    s.lost.then((/** @type {any} */ end) => {
      if (session !== s) return;
      session = null;
      const code = end.reason === "expired" ? "LOCK_EXPIRED" : "FENCED";
      message(prompt(code, getLang()), "error");
      render();
    });
    s.ended.then(() => {
      if (session === s && !s.active) session = null;
      render();
    });
  } catch (err) {
    const e = /** @type {any} */ (err);
    if (e.payAtFrontDesk) {
      frontDesk = e.message;
    } else {
      message(e.message ?? String(e), "error");
    }
  }
  render();
}

async function confirmPayment() {
  const s = session;
  if (!s) return;
  const ref = paymentRef(`h5-${table}`);
  try {
    const result = await s.complete({ paymentRef: ref });
    paidInfo = { ref, amount: result.payment?.amount_cents ?? s.amountCents };
    order = result.order;
    session = null;
    message("");
  } catch (err) {
    const e = /** @type {any} */ (err);
    if (e.payAtFrontDesk) frontDesk = e.message;
    else message(e.message ?? String(e), "error");
    if (!s.active) session = null;
  }
}

// --- start ------------------------------------------------------------------------------------------

bindConnection(client, () => {
  render();
});
onLangChange(() => {
  if (note) message(note.text, /** @type {any} */ (note.tone));
  render();
});
render();
client.ready.then(() => loadOrder(true)).catch((err) => message(String(err?.message ?? err), "error"));
// A table without an order yet, or a paid one: look again now and then.
setInterval(() => {
  if (client.connected && !session && (!order || (order.status ?? "open") !== "open") && !paidInfo) loadOrder(false);
}, 5000);
