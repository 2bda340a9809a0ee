// Shared by the dashboard and the terminal pages: tokens, locale, formatting, the table states,
// dialogs, toasts and the connection indicator. Everything lock-related goes through the SDK.
import { ROLES, TablelockClient, capability, prompt } from "/sdk/tablelock.js";
import { LANGS, MENU, REASONS, STRINGS } from "./i18n.js";

export const params = new URLSearchParams(location.search);

// --- roles: what the capability table (the SDK's generated constants) says of them ----------

/** A scan-to-order phone (h5): its name is usually its id. @param {string|null|undefined} role */
export const isPhone = (role) => capability(role ?? null, "scan_to_order") === true;
/** Its locks are never renewed: they run down to `expires_at`. @param {string|null|undefined} role */
export const locksRunDown = (role) => capability(role ?? null, "renew") === false;
/**
 * It records payments without holding a lock itself: the platform's payment service, for a phone.
 * @param {string|null|undefined} role
 */
export const recordsForPhones = (role) =>
  capability(role ?? null, "record_payment") === true && capability(role ?? null, "lock_kinds")?.length === 0;
/** The tills: the roles that publish orders. */
export const TILL_ROLES = ROLES.filter((role) => capability(role, "publish"));

// --- locale -----------------------------------------------------------------------------

let lang = LANGS.includes(params.get("lang") ?? "") ? /** @type {string} */ (params.get("lang")) : "zh-CN";
/** @type {Array<(lang: string) => void>} */
const langListeners = [];

export function getLang() {
  return lang;
}

/**
 * The page text for `key`, with `{name}` placeholders filled from `vars`.
 * @param {string} key
 * @param {Record<string, unknown>} [vars]
 */
export function t(key, vars = {}) {
  const text = STRINGS[lang]?.[key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => (name in vars ? String(vars[name]) : `{${name}}`));
}

/** Fill every `data-i18n` (text), `data-i18n-placeholder` and `data-i18n-title` under `root`. */
export function applyI18n(root = document) {
  document.documentElement.lang = lang;
  for (const el of root.querySelectorAll("[data-i18n]")) {
    el.textContent = t(/** @type {string} */ (el.getAttribute("data-i18n")));
  }
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) {
    el.setAttribute("placeholder", t(/** @type {string} */ (el.getAttribute("data-i18n-placeholder"))));
  }
  for (const el of root.querySelectorAll("[data-i18n-title]")) {
    el.setAttribute("title", t(/** @type {string} */ (el.getAttribute("data-i18n-title"))));
  }
}

/** @param {(lang: string) => void} listener called after the locale changed */
export function onLangChange(listener) {
  langListeners.push(listener);
}

/** Switch the locale in place: URL (?lang=, the #token stays), texts, then the listeners. */
export function setLang(next) {
  if (!LANGS.includes(next) || next === lang) return;
  lang = next;
  params.set("lang", next);
  history.replaceState(null, "", `${location.pathname}?${params}${location.hash}`);
  applyI18n();
  const select = document.querySelector("[data-testid=lang-switch]");
  if (select instanceof HTMLSelectElement) select.value = next;
  for (const listener of langListeners) listener(next);
}

/** Wire the `<select data-testid="lang-switch">` of the page. */
export function setupLangSwitch() {
  const select = document.querySelector("[data-testid=lang-switch]");
  if (!(select instanceof HTMLSelectElement)) return;
  select.value = lang;
  select.addEventListener("change", () => setLang(select.value));
}

/**
 * The broker's messages follow the page's locale: switching it says hello again (locks stay,
 * the terminal is back within its grace; each channel is subscribed again at its position).
 * @param {TablelockClient} client
 */
export function followLang(client) {
  onLangChange((next) => {
    client.options.locale = /** @type {any} */ (next);
    client.reconnect();
  });
}

// --- formatting ------------------------------------------------------------------------

const esc = (/** @type {unknown} */ s) => String(s ?? "").replace(/[&<>"']/g,
  (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c] ?? c);
export { esc };

/** @param {number|null|undefined} cents */
export function money(cents) {
  if (typeof cents !== "number") return "—";
  return `¥${(cents / 100).toFixed(2)}`;
}

/** "12s ago" on the given clock. @param {number} ts @param {number} now */
export function ago(ts, now) {
  const s = Math.max(0, Math.round((now - ts) / 1000));
  if (s < 3) return t("time.now");
  if (s < 60) return t("time.s", { n: s });
  if (s < 3600) return t("time.m", { n: Math.floor(s / 60) });
  return t("time.h", { n: Math.floor(s / 3600) });
}

/** @param {number} ts */
export function clock(ts) {
  return new Date(ts).toLocaleTimeString(lang === "en" ? "en-GB" : "zh-CN", { hour12: false });
}

/** @param {string} role */
export function roleLabel(role) {
  return t(`role.${role}`);
}

/** @param {string} kind */
export function kindLabel(kind) {
  return t(`kind.${kind}`);
}

/**
 * Who a holder or terminal is, for a sentence: its name, and its role when the name says
 * nothing more (an H5 phone's name is usually its id).
 * @param {{terminal_id?: string, role?: string, name?: string}|null|undefined} who
 */
export function whoLabel(who) {
  if (!who) return "?";
  const role = who.role ? roleLabel(who.role) : "";
  const named = Boolean(who.name) && who.name !== who.terminal_id;
  if (isPhone(who.role)) return named ? `${role} ${who.name}` : role;
  if (!named) return `${role} ${who.terminal_id ?? ""}`.trim() || "?";
  if (!role) return String(who.name);
  return lang === "en" ? `${who.name} (${role})` : `${who.name}（${role}）`;
}

/** An order item's name, count and price, whatever shape the ERP gave it. @param {any} item */
export function itemInfo(item) {
  if (item === null || typeof item !== "object") return { sku: String(item), name: String(item), qty: 1, price: null };
  const sku = String(item.sku ?? item.id ?? item.name ?? "?");
  const menu = MENU[/** @type {keyof typeof MENU} */ (sku)];
  const name = menu ? menu[lang === "en" ? 1 : 0] : String(item.name ?? sku);
  const qty = typeof item.qty === "number" ? item.qty : 1;
  const price = typeof item.price_cents === "number" ? item.price_cents : menu ? menu[2] : null;
  return { sku, name, qty, price };
}

/** @param {string} sku */
export function dishName(sku) {
  const menu = MENU[/** @type {keyof typeof MENU} */ (sku)];
  return menu ? menu[lang === "en" ? 1 : 0] : sku;
}

export { MENU, prompt };

/**
 * A force reason in the page's language when it is one the demo's terminals give (either
 * language's text, or its key), else as the operator typed it.
 * @param {string|null|undefined} reason
 */
export function reasonText(reason) {
  if (!reason) return "";
  const known = REASONS[reason] ?? Object.values(REASONS).find((r) => r.zh === reason || r.en === reason);
  return known ? known[lang === "en" ? "en" : "zh"] : reason;
}

/**
 * What a page says, kept so that it is said again in the other language after a switch:
 * a broker code (its prompt; `variant` as prompt() takes it), a page text key, or a function
 * that writes it in the current language.
 * @typedef {{code: string, variant?: string} | {key: string, vars?: Record<string, unknown>} |
 *   {fn: () => string} | {text: string}} Said
 * @param {Said} said
 */
export function sayText(said) {
  if ("code" in said) return prompt(said.code, lang, said.variant ?? "");
  if ("fn" in said) return said.fn();
  if ("key" in said) {
    // A var may itself be a broker code ({code}): its prompt, in the current language.
    const vars = Object.fromEntries(Object.entries(said.vars ?? {}).map(([name, v]) =>
      [name, v && typeof v === "object" && "code" in v ? prompt(String(v.code), lang) : v]));
    return t(said.key, vars);
  }
  return said.text;
}

/**
 * The Said of an error: its code when the SDK knows its prompt, else its message.
 * @param {any} err @param {string} [variant]
 * @returns {Said}
 */
export function saidOf(err, variant = "") {
  const code = err?.code;
  if (typeof code === "string" && prompt(code, "en") !== code) return { code, variant };
  return { text: String(err?.message ?? err) };
}

/** The text of an order status ("open", "paid", "closed"). @param {string|null|undefined} status */
export function statusLabel(status) {
  return t(`status.${status ?? "open"}`);
}

// --- tokens and the connection -----------------------------------------------------------

/** The page's token: `#token=...`, else (demo broker only) `POST /demo/token`. */
export function tokenSource(/** @type {{role: string, sub: string, table?: string, name?: string}} */ body) {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) return fromHash;
  return async () => {
    const response = await fetch("/demo/token", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(`/demo/token: HTTP ${response.status}`);
    return (await response.json()).token;
  };
}

/** The claims of a `#token=` (unverified: only to know the table or store before hello). */
export function hashClaims() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (!token) return null;
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(decodeURIComponent(escape(atob(part + "===".slice((part.length + 3) % 4)))));
  } catch {
    return null;
  }
}

export function wsUrl() {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
}

/**
 * A client that keeps (re)connecting by itself, even when the broker is down as the page loads.
 * @param {{token: any, onOrderFetch?: any, orderAuthority?: boolean}} options
 */
export function openClient(options) {
  const client = new TablelockClient({
    url: wsUrl(),
    locale: /** @type {any} */ (lang),
    reconnect: { minDelayMs: 250, maxDelayMs: 4000 },
    clientInfo: { name: "tablelock-demo-page", version: "0.1.0" },
    ...options,
  });
  followLang(client);
  return client;
}

/** The current token string of a client (for the HTTP API). @param {TablelockClient} client */
export function currentToken(client) {
  return client.token ?? (typeof client.options.token === "string" ? client.options.token : "");
}

/**
 * The connection pill `[data-testid=conn-state]` and `[data-testid=stale-banner]`, and the
 * body's `is-stale` class (which greys the page and disables the actions).
 * @param {TablelockClient} client
 * @param {() => void} [onChange]
 */
export function bindConnection(client, onChange) {
  const pill = document.querySelector("[data-testid=conn-state]");
  const banner = document.querySelector("[data-testid=stale-banner]");
  let fatal = "";
  const render = () => {
    let state = "connecting";
    if (fatal) state = "failed";
    else if (client.connected && !client.stale) state = "live";
    else if (client.hello) state = "stale";
    const stale = state !== "live";
    document.body.classList.toggle("is-stale", stale);
    if (pill) {
      pill.setAttribute("data-state", state);
      pill.textContent = state === "failed" ? t("conn.failed") : t(`conn.${state}`);
      pill.setAttribute("title", fatal);
    }
    if (banner instanceof HTMLElement) {
      banner.hidden = state === "live" || state === "connecting";
      banner.textContent = fatal ? t("conn.fatal", { message: fatal }) : t("conn.banner");
    }
    for (const el of document.querySelectorAll("[data-action]")) {
      if (el instanceof HTMLButtonElement || el instanceof HTMLInputElement ||
          el instanceof HTMLSelectElement) {
        el.disabled = stale || el.hasAttribute("data-off");
      }
    }
    onChange?.();
  };
  for (const name of ["open", "close", "stale"]) client.addEventListener(name, render);
  client.addEventListener("error", (e) => {
    fatal = /** @type {CustomEvent} */ (e).detail?.error?.message ?? "error";
    render();
  });
  onLangChange(render);
  render();
  return render;
}

/** Disable (or not) an action button the way bindConnection keeps it. @param {Element} el */
export function setOff(el, off) {
  if (off) el.setAttribute("data-off", "");
  else el.removeAttribute("data-off");
  if (el instanceof HTMLButtonElement) el.disabled = off || document.body.classList.contains("is-stale");
}

// --- tables ---------------------------------------------------------------------------

/** T01..Tn (n from ?tables=, default 12). */
export function baseTables() {
  const n = Math.max(0, Math.min(200, Number.parseInt(params.get("tables") ?? "12", 10) || 12));
  return Array.from({ length: n }, (_, i) => `T${String(i + 1).padStart(2, "0")}`);
}

/** Natural sort of table ids: T2 before T10. */
export function sortTables(/** @type {string[]} */ ids) {
  return ids.sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
}

export const STATES = ["free", "ordering", "editing", "paying", "prebilled", "paid"];
const STATE_OF_KIND = { payment: "paying", presettle: "prebilled", order: "editing" };

/**
 * What each table shows, from the store mirror's open orders and locks, plus recently paid
 * orders the page remembered (the store mirror keeps open orders only).
 * @param {{orders: Map<string, any>, locks: Map<string, any>}} mirror
 * @param {Map<string, {order: any, payment: any, ts: number}>} paid by table id
 * @returns {Map<string, {table: string, state: string, orders: any[], locks: any[], paid: any}>}
 */
export function tableModel(mirror, paid) {
  /** @type {Map<string, {table: string, state: string, orders: any[], locks: any[], paid: any}>} */
  const tables = new Map();
  const get = (/** @type {string} */ id) => {
    let entry = tables.get(id);
    if (!entry) {
      entry = { table: id, state: "free", orders: [], locks: [], paid: null };
      tables.set(id, entry);
    }
    return entry;
  };
  for (const id of baseTables()) get(id);
  for (const order of mirror.orders.values()) {
    if (order.status && order.status !== "open") continue;
    get(order.table_id).orders.push(order);
  }
  for (const lock of mirror.locks.values()) {
    const order = mirror.orders.get(lock.order_id);
    if (order) get(order.table_id).locks.push(lock);
  }
  for (const [table, info] of paid) get(table).paid = info;
  const rank = { payment: 0, presettle: 1, order: 2 };
  for (const entry of tables.values()) {
    entry.orders.sort((a, b) => String(a.order_id).localeCompare(String(b.order_id)));
    entry.locks.sort((a, b) => rank[a.kind] - rank[b.kind]);
    if (entry.locks.length) entry.state = STATE_OF_KIND[entry.locks[0].kind];
    else if (entry.orders.length) entry.state = "ordering";
    else if (entry.paid) entry.state = "paid";
  }
  return tables;
}

// --- dialogs and toasts -------------------------------------------------------------------

/**
 * A modal dialog (`[data-testid=dialog]`). Resolves with the values of its fields on confirm,
 * or null on cancel. `validate(values)` returns an error text to keep it open.
 * @param {{title: string, body?: string, message?: string, fields?: Array<{name: string,
 *   label: string, placeholder?: string, value?: string, readonly?: boolean, multiline?: boolean}>,
 *   confirm?: string, cancel?: string, danger?: boolean,
 *   validate?: (values: Record<string, string>) => string | null,
 *   submit?: (values: Record<string, string>) => Promise<string | null | void>}} spec
 *   `submit` runs on confirm; a string it returns (or throws) is shown and keeps it open
 * @returns {Promise<Record<string, string>|null>}
 */
export function dialog(spec) {
  document.querySelector("dialog[data-testid=dialog]")?.remove();
  const el = document.createElement("dialog");
  el.setAttribute("data-testid", "dialog");
  el.className = spec.danger ? "dialog danger" : "dialog";
  const fields = (spec.fields ?? []).map((f) => `
    <label class="field">
      <span>${esc(f.label)}</span>
      ${f.multiline
        ? `<textarea name="${esc(f.name)}" data-testid="dialog-${esc(f.name)}" rows="3" placeholder="${esc(f.placeholder ?? "")}" ${f.readonly ? "readonly" : ""}>${esc(f.value ?? "")}</textarea>`
        : `<input name="${esc(f.name)}" data-testid="dialog-${esc(f.name)}" value="${esc(f.value ?? "")}" placeholder="${esc(f.placeholder ?? "")}" ${f.readonly ? "readonly" : ""}>`}
    </label>`).join("");
  el.innerHTML = `
    <form method="dialog" novalidate>
      <h2 data-testid="dialog-title">${esc(spec.title)}</h2>
      ${spec.message ? `<p class="dialog-message" data-testid="dialog-message">${esc(spec.message)}</p>` : ""}
      ${spec.body ? `<p class="dialog-body">${esc(spec.body)}</p>` : ""}
      ${fields}
      <p class="dialog-error" data-testid="dialog-error" role="alert" hidden></p>
      <div class="dialog-buttons">
        <button type="button" class="btn" data-testid="dialog-cancel">${esc(spec.cancel ?? t("dialog.cancel"))}</button>
        <button type="submit" class="btn ${spec.danger ? "btn-danger" : "btn-primary"}" data-testid="dialog-confirm">${esc(spec.confirm ?? t("dialog.ok"))}</button>
      </div>
    </form>`;
  document.body.append(el);
  const form = /** @type {HTMLFormElement} */ (el.querySelector("form"));
  const error = /** @type {HTMLElement} */ (el.querySelector("[data-testid=dialog-error]"));
  const confirmBtn = /** @type {HTMLButtonElement} */ (el.querySelector("[data-testid=dialog-confirm]"));
  return new Promise((resolve) => {
    const done = (/** @type {Record<string, string>|null} */ value) => {
      el.close();
      el.remove();
      resolve(value);
    };
    el.querySelector("[data-testid=dialog-cancel]")?.addEventListener("click", () => done(null));
    el.addEventListener("cancel", (e) => {
      e.preventDefault();
      done(null);
    });
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      /** @type {Record<string, string>} */
      const values = {};
      for (const [k, v] of new FormData(form)) values[k] = String(v);
      const problem = spec.validate?.(values) ?? null;
      if (problem) {
        error.textContent = problem;
        error.hidden = false;
        return;
      }
      if (spec.submit) {
        confirmBtn.disabled = true;
        let failure = null;
        try {
          failure = (await spec.submit(values)) ?? null;
        } catch (err) {
          failure = /** @type {any} */ (err)?.message ?? String(err);
        }
        confirmBtn.disabled = false;
        if (failure) {
          error.textContent = failure;
          error.hidden = false;
          return;
        }
      }
      done(values);
    });
    el.showModal();
    /** @type {HTMLElement|null} */ (el.querySelector("textarea, input:not([readonly])") ?? confirmBtn)?.focus();
  });
}

const TOASTS_SHOWN = 3; // the newest ones; older toasts go at once

/**
 * A toast at the bottom (`[data-testid=toast]`, the newest one).
 * @param {string} text
 * @param {"info"|"warn"|"error"|"ok"} [tone]
 */
export function toast(text, tone = "info", ms = 6000) {
  // A page may give the stack a place in its layout (the ERP page: above its log), so that
  // toasts never cover anything; else they float at the bottom.
  let stack = document.querySelector(".toasts");
  if (!stack) {
    stack = document.createElement("div");
    stack.className = "toasts";
    stack.setAttribute("aria-live", "polite");
    document.body.append(stack);
  }
  for (const old of stack.querySelectorAll("[data-testid=toast]")) old.removeAttribute("data-testid");
  const el = document.createElement("div");
  el.className = `toast toast-${tone}`;
  el.setAttribute("data-testid", "toast");
  el.setAttribute("role", tone === "error" || tone === "warn" ? "alert" : "status");
  el.textContent = text;
  stack.append(el);
  const shown = [...stack.children].filter((c) => !c.classList.contains("toast-out"));
  for (const old of shown.slice(0, Math.max(0, shown.length - TOASTS_SHOWN))) old.remove();
  setTimeout(() => {
    el.classList.add("toast-out");
    setTimeout(() => el.remove(), 400);
  }, ms);
}

/** Restart the CSS flash animation of `el`. @param {Element} el */
export function flash(el) {
  el.classList.remove("flash");
  void (/** @type {HTMLElement} */ (el)).offsetWidth;
  el.classList.add("flash");
}

/** The payment-ref of a demo payment. @param {string} prefix */
export function paymentRef(prefix) {
  return `${prefix}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 7)}`;
}
