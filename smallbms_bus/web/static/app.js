// The commissioning page: the live readout from the stream, and the JSON API (docs/api.md) for the rest.
// Plain JavaScript, no build step. The password stays in this tab (sessionStorage) and goes out only as
// "Authorization: Bearer" on writes; without it every write control is hidden.
"use strict";

const API = "/api/v1";
const state = { password: sessionStorage.getItem("smallbms-password"), canWrite: false, preAlarm: 3.1, settings: [] };
const $ = (id) => document.getElementById(id);

function text(id, value) { $(id).textContent = value; }
function fmt(value, digits, unit) { return value === null || value === undefined ? "--" : `${value.toFixed(digits)} ${unit}`; }
function when(unix) { return unix ? new Date(unix * 1000).toLocaleString() : "never"; }
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

async function call(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.password) headers.Authorization = `Bearer ${state.password}`;
  let answer;
  try {
    answer = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    throw new Error(`the service does not answer (${error.message})`);
  }
  const data = await answer.json().catch(() => ({ error: `HTTP ${answer.status}` }));
  if (!answer.ok) {
    if (answer.status === 401) logout(data.error);
    const error = new Error(data.error || `HTTP ${answer.status}`);
    error.status = answer.status;
    throw error;
  }
  return data;
}

// -- access -------------------------------------------------------------------------------------------------
async function checkAccess() {
  let access;
  try {
    access = await call("GET", "/access");
  } catch (error) {
    access = { password_set: true, write_allowed_from_here: true, authenticated: false };
  }
  state.canWrite = Boolean(access.authenticated);
  document.body.classList.toggle("read-only", !state.canWrite);
  let why = "read-only";
  if (!access.password_set) why = "read-only: no password is configured ([web] password)";
  else if (!access.write_allowed_from_here) why = `read-only: writes are not allowed from ${access.address}`;
  text("access-state", state.canWrite ? "logged in: changes allowed" : why);
  const showLogin = !state.canWrite && access.password_set && access.write_allowed_from_here;
  $("login-password").hidden = !showLogin;
  $("login-button").hidden = !showLogin;
  $("logout-button").hidden = !state.canWrite;
  text("settings-note", state.canWrite ? "Each change is checked and saved before the answer; the range is beside it."
    : "Log in to change settings. Each is checked and saved before the answer.");
  for (const control of document.querySelectorAll(".write-control")) control.disabled = !state.canWrite;
}

function logout(message) {
  state.password = null;
  sessionStorage.removeItem("smallbms-password");
  state.canWrite = false;
  document.body.classList.add("read-only");
  if (message) text("access-state", message);
  checkAccess();
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.password = $("login-password").value;
  try {
    await call("GET", "/access");
    sessionStorage.setItem("smallbms-password", state.password);
    $("login-password").value = "";
  } catch (error) {
    state.password = null;
    text("access-state", error.message);
    return;
  }
  await checkAccess();
});
$("logout-button").addEventListener("click", () => logout("logged out"));

// -- the live readout -----------------------------------------------------------------------------------------
function cellClass(voltage) {
  if (voltage === null) return "none";
  if (voltage < 2.9) return "low";
  if (voltage <= state.preAlarm) return "pre";
  if (voltage >= 3.55) return "high";
  return "ok";
}

function pill(id, on, label, onIsBad = false) {
  const node = $(id);
  node.textContent = `${label} ${on ? "on" : "off"}`;
  node.className = `pill ${on !== onIsBad ? "on" : "off"}`;  // green = the normal state, red = attention
}

function showStatus(s) {
  const b = s.bank;
  text("soc", s.soc === null ? "unknown" : `${s.soc.toFixed(1)} %`);
  text("bank-voltage", fmt(b.voltage, 2, "V"));
  text("bank-current", b.current === null ? "--" : `${b.current >= 0 ? "+" : ""}${b.current.toFixed(1)} A`);
  text("bank-power", fmt(b.power, 0, "W"));
  text("phase", s.started ? s.phase : `${s.phase} (not started: outputs held off)`);
  text("consumed", s.consumed);
  text("time-remaining", s.time_remaining);
  text("bank-shape", b.nominal_voltage === null ? `${b.batteries} batteries, shape unknown`
    : `${b.series}S${b.parallel}P ${b.nominal_voltage} V ${b.capacity_ah} Ah, ${b.batteries} batteries, ${b.cells} cells`);
  text("cell-extremes", b.min_cell && b.max_cell
    ? `min ${b.min_cell.voltage.toFixed(3)} V (battery ${b.min_cell.battery} cell ${b.min_cell.cell}), max ${b.max_cell.voltage.toFixed(3)} V (battery ${b.max_cell.battery} cell ${b.max_cell.cell})`
    : "--");
  text("temperatures", `cells ${fmt(b.min_cell_temperature, 1, "°C")} .. ${fmt(b.max_cell_temperature, 1, "°C")}, batteries ${fmt(b.min_battery_temperature, 1, "°C")} .. ${fmt(b.max_battery_temperature, 1, "°C")}`);
  text("atc", (s.atc ? "yes" : "no") + (s.reasons.ATC ? ` (${s.reasons.ATC})` : ""));
  text("atd", s.atd_state + (s.reasons.ATD ? ` (${s.reasons.ATD})` : ""));
  text("balancer", s.balancer);
  text("link", s.link.up ? "up" : `DOWN: ${s.link.reason}`);
  const c = s.charge;
  text("charge-limits", c.known ? `CVL ${c.cvl.toFixed(2)} V, CCL ${c.ccl.toFixed(1)} A, DCL ${c.dcl.toFixed(1)} A (${c.state})`
    : "not known (charge control has no limits for this bank yet)");
  pill("out-load", s.outputs.load_disconnect, "load");
  pill("out-charge", s.outputs.charge_disconnect, "charge");
  pill("out-pre-alarm", s.outputs.pre_alarm, "pre-alarm", true);
  pill("remote", s.remote === "on", "remote input");
  pill("mode", s.mode === "on", "mode");
  const alarms = $("alarms");
  alarms.replaceChildren(...[...s.alarms.map((a) => [a, "alarm"]), ...s.warnings.map((w) => [w, "warning"])]
    .map(([item, kind]) => el("li", { class: kind, text: `${kind} ${item.name}: ${item.reason}` })));
  if (!alarms.children.length) alarms.append(el("li", { class: "muted", text: "none" }));
  showBatteries(s.batteries);
}

function showBatteries(batteries) {
  const list = el("div", { class: "batteries" });
  for (const bat of batteries) {
    const cells = el("div", { class: "cells" });
    bat.cells.forEach((v, i) => cells.append(el("span", {
      class: `cell ${cellClass(v)}`, "data-battery": bat.node, "data-cell": i + 1,
      title: `battery ${bat.node} cell ${i + 1}`, text: v === null ? "--" : v.toFixed(3),
    })));
    const flags = bat.flags.length ? bat.flags.join(", ") : "none";
    list.append(el("div", { class: `battery${bat.fresh ? "" : " stale"}`, id: `battery-${bat.node}` },
      el("h3", { text: `Battery ${bat.node}` }),
      el("div", { class: "muted", text: `serial ${bat.serial || "?"}, ${bat.nominal_voltage ?? "?"} V ${bat.capacity_ah ?? "?"} Ah, firmware ${bat.firmware || "?"}` }),
      el("div", { text: `${fmt(bat.voltage, 3, "V")}  ${fmt(bat.current, 1, "A")}  ${fmt(bat.temperature, 1, "°C")}` }),
      el("div", { class: bat.fresh ? "muted" : "error", text: bat.fresh ? `fresh (${bat.status_age_s ?? "--"} s), flags: ${flags}` : `STALE: ${bat.stale}` }),
      cells));
  }
  $("battery-list").replaceChildren(list);
}

function connect() {
  const source = new EventSource(`${API}/stream`);
  source.addEventListener("status", (event) => {
    showStatus(JSON.parse(event.data));
    $("live").textContent = "live";
    $("live").className = "badge on";
  });
  source.onerror = () => {
    $("live").textContent = "reconnecting";
    $("live").className = "badge off";
  };
}

// -- settings ------------------------------------------------------------------------------------------------
function settingRow(s) {
  let range = s.min === null ? s.note : `${s.min} .. ${s.max} ${s.unit}, step ${s.step}, default ${s.default}`;
  if (s.units_in_series) range += ` (the whole bank: ${s.per_unit_value} V x ${s.units_in_series} units in series)`;
  const input = el("input", { id: `setting-${s.name}`, class: "write-control", type: "number", step: String(s.step),
    inputmode: "decimal", "aria-label": s.label });
  if (s.min !== null) { input.min = s.min; input.max = s.max; }
  if (s.value !== null) input.value = s.value;
  const save = el("button", { id: `save-${s.name}`, class: "write-control", type: "button", text: "Save" });
  const error = el("div", { id: `error-${s.name}`, class: "error", role: "alert" });
  const shown = el("span", { id: `value-${s.name}`, text: s.value === null ? "--" : `${s.value} ${s.unit}` });
  save.addEventListener("click", async () => {
    error.textContent = "";
    error.className = "error";
    const value = Number(input.value);
    if (input.value.trim() === "" || !Number.isFinite(value)) { error.textContent = "enter a number"; return; }
    save.disabled = true;
    try {
      const answer = await call("PUT", `/settings/${s.name}`, { value });
      shown.textContent = `${answer.setting.value} ${answer.setting.unit}`;
      input.value = answer.setting.value;
      error.className = "ok-text";
      error.textContent = "saved";
      loadEvents();
    } catch (failure) {
      error.textContent = failure.message;
      input.value = s.value ?? "";
      loadSettings();
    } finally {
      save.disabled = !state.canWrite;
    }
  });
  return el("div", { class: "setting", id: `row-${s.name}` },
    el("div", { class: "what" }, el("strong", { text: s.label }), " ", shown,
      el("div", { class: "muted", text: `${s.name}: ${range}` }), el("div", { class: "muted", text: s.description })),
    el("div", { class: "edit" }, input, el("span", { class: "write-control", text: s.unit }), save), error);
}

async function loadSettings() {
  try {
    const { settings } = await call("GET", "/settings");
    state.settings = settings;
    const pre = settings.find((s) => s.name === "pre_alarm_level");
    if (pre && pre.value !== null) state.preAlarm = pre.value;
    const list = $("settings-list");
    const errors = {};
    for (const node of list.querySelectorAll(".error")) if (node.textContent) errors[node.id] = node.textContent;
    list.replaceChildren(...settings.map(settingRow));
    for (const [id, message] of Object.entries(errors)) if ($(id)) $(id).textContent = message;
    for (const control of list.querySelectorAll(".write-control")) control.disabled = !state.canWrite;
  } catch (error) {
    text("settings-note", error.message);
  }
}

// -- mode and commands -----------------------------------------------------------------------------------------
async function setMode(mode) {
  const what = mode === "off" ? "Mode OFF opens the load and charge relays: loads and chargers stop. Continue?"
    : "Mode ON lets the BMS close the load and charge relays again. Continue?";
  if (!window.confirm(what)) return;
  text("mode-error", "");
  try {
    await call("POST", "/mode", { mode });
    loadEvents();
  } catch (error) {
    text("mode-error", error.message);
  }
}
$("mode-on").addEventListener("click", () => setMode("on"));
$("mode-off").addEventListener("click", () => setMode("off"));

for (const button of document.querySelectorAll("button.command")) {
  button.addEventListener("click", async () => {
    if (!window.confirm(button.dataset.confirm)) return;
    text("command-error", "");
    text("command-result", "");
    try {
      const answer = await call("POST", `/commands/${button.dataset.command}`);
      text("command-result", `done: ${answer.done.join("; ")}`);
      loadSettings(); loadHistory(); loadEvents();
    } catch (error) {
      text("command-error", error.message);
    }
  });
}

$("soc-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const soc = Number($("soc-input").value);
  text("command-error", "");
  if ($("soc-input").value.trim() === "" || !Number.isFinite(soc)) { text("command-error", "enter the SoC in %"); return; }
  if (!window.confirm(`Set the SoC to ${soc} %?`)) return;
  try {
    const answer = await call("POST", "/soc", { soc });
    text("command-result", `done: ${answer.done.join("; ")}`);
    loadEvents();
  } catch (error) {
    text("command-error", error.message);
  }
});

// -- history and events ------------------------------------------------------------------------------------------
const HISTORY = [
  ["deepest_discharge_ah", "deepest discharge", 1, "Ah"], ["last_discharge_ah", "last discharge", 1, "Ah"],
  ["cumulative_ah_drawn", "cumulative Ah drawn", 1, "Ah"], ["discharged_energy_kwh", "discharged energy", 2, "kWh"],
  ["charged_energy_kwh", "charged energy", 2, "kWh"], ["synchronisations", "synchronisations", 0, ""],
  ["charge_cycles", "charge cycles", 0, ""], ["full_discharges", "full discharges", 0, ""],
  ["min_bank_voltage", "minimum bank voltage", 2, "V"], ["max_bank_voltage", "maximum bank voltage", 2, "V"],
  ["min_cell_voltage", "minimum cell voltage", 3, "V"], ["max_cell_voltage", "maximum cell voltage", 3, "V"],
  ["min_battery_temperature", "minimum temperature", 1, "°C"], ["max_battery_temperature", "maximum temperature", 1, "°C"],
];

async function loadHistory() {
  try {
    const h = await call("GET", "/history");
    const rows = HISTORY.flatMap(([key, label, digits, unit]) => [el("dt", { text: label }),
      el("dd", { id: `history-${key}`, text: h[key] === null ? "--" : `${Number(h[key]).toFixed(digits)} ${unit}`.trim() })]);
    rows.push(el("dt", { text: "last full charge" }), el("dd", { text: when(h.last_full_charge_wall) }));
    $("history-list").replaceChildren(...rows);
  } catch (error) {
    $("history-list").replaceChildren(el("dd", { class: "error", text: error.message }));
  }
}

async function loadEvents() {
  try {
    const { events } = await call("GET", "/events?limit=100");
    $("event-table").tBodies[0].replaceChildren(...events.map((e) => el("tr", { class: `event ${e.kind}` },
      el("td", { class: "when", text: when(e.time) }), el("td", { text: e.name }), el("td", { text: e.value }),
      el("td", { text: e.reason }))));
  } catch (error) {
    $("event-table").tBodies[0].replaceChildren(el("tr", {}, el("td", { class: "error", text: error.message })));
  }
}
$("events-refresh").addEventListener("click", loadEvents);

// -- start ------------------------------------------------------------------------------------------------------
(async () => {
  await checkAccess();
  connect();
  loadSettings();
  loadHistory();
  loadEvents();
  // history and the event log change slowly: a refresh every 30 s, never a polling storm
  setInterval(() => { loadHistory(); loadEvents(); }, 30000);
})();
