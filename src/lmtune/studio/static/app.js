// lmtune studio: the form is generated from RunConfig's JSON schema (GET /api/schema); every other page reads
// the JSON API of lmtune/studio/server.py. Plain JavaScript, no build step.
"use strict";
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const state = {schema: null, methods: {}, selectedRun: null, chat: {run: [], base: []}, estimateSeq: 0};

async function api(path, body) {
  const res = await fetch("/api/" + path, body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await res.json().catch(() => ({errors: [{field: "", message: `server answered ${res.status}`}]}));
  if (!res.ok) { const err = new Error(data.errors.map(e => e.message).join("; ")); err.errors = data.errors; throw err; }
  return data;
}

// ---- pages ------------------------------------------------------------------------------------------------
function showPage(name) {
  $$("nav button").forEach(b => b.classList.toggle("active", b.dataset.page === name));
  $$(".page").forEach(p => p.classList.toggle("active", p.id === "page-" + name));
  if (name === "runs") refreshRuns();
  if (name === "chat") refreshChatRuns();
  if (name === "compare") refreshCompareList();
}
$$("nav button").forEach(b => b.addEventListener("click", () => showPage(b.dataset.page)));

// ---- the form, from the JSON schema ----------------------------------------------------------------------
function resolve(s) { return s && s.$ref ? state.schema.$defs[s.$ref.split("/").pop()] : s; }

function kindOf(s) {
  s = resolve(s);
  if (s.anyOf) {
    const some = s.anyOf.filter(x => x.type !== "null");
    const k = some.length === 1 ? kindOf(some[0]) : {kind: "yaml"};
    return {...k, nullable: some.length < s.anyOf.length};
  }
  if (s.enum) return {kind: "enum", options: s.enum};
  if (s.const !== undefined) return {kind: "const"};
  if (s.type === "boolean") return {kind: "bool"};
  if (s.type === "integer" || s.type === "number") return {kind: "number"};
  if (s.type === "string") return {kind: "string"};
  if (s.type === "array") return {kind: "array"};
  return {kind: "yaml"};
}

function fieldRow(key, prop, required) {
  const k = kindOf(prop), row = document.createElement("div");
  row.className = "field"; row.dataset.key = key;
  const id = "f-" + key.replace(/\./g, "-");
  let input;
  if (k.kind === "bool") { input = document.createElement("input"); input.type = "checkbox"; }
  else if (k.kind === "enum") {
    input = document.createElement("select");
    k.options.forEach(o => input.add(new Option(o, o)));
  } else if (k.kind === "array") { input = document.createElement("textarea"); input.rows = 2; }
  else if (k.kind === "string") { input = document.createElement("textarea"); input.rows = 1; }  // may hold newlines
  else { input = document.createElement("input"); input.type = "text"; }
  input.id = id; input.name = key; input.dataset.kind = k.kind; input.dataset.nullable = k.nullable ? "1" : "";
  if (k.kind === "array") input.placeholder = "one per line" + (k.nullable ? " (empty: none)" : "");
  else if (k.nullable) input.placeholder = "empty: none";
  setValue(input, prop.default === undefined ? null : prop.default);
  const label = Object.assign(document.createElement("label"), {htmlFor: id, textContent: key + (required ? " *" : "")});
  const help = Object.assign(document.createElement("div"), {className: "help", textContent: prop.description || ""});
  const error = Object.assign(document.createElement("div"), {className: "error"});
  row.append(label, input, help, error);
  return row;
}

function section(schema, prefix, title, description) {
  const box = document.createElement("fieldset");
  box.innerHTML = `<legend>${esc(title)} <small>${esc(description || "")}</small></legend>`;
  for (const [name, prop] of Object.entries(schema.properties)) {
    const key = prefix + name, sub = resolve(prop);
    if (key === "method") box.append(methodSection(prop));
    else if (sub.properties) box.append(section(sub, key + ".", name, prop.description));
    else box.append(fieldRow(key, prop, (schema.required || []).includes(name)));
  }
  return box;
}

function methodSection(prop) {
  const box = document.createElement("fieldset");
  box.innerHTML = `<legend>method <small>${esc(prop.description)}</small></legend>`;
  const row = fieldRow("method.name", {enum: Object.keys(state.methods), default: state.methodDefault,
    description: "Which fine-tuning method; its options follow."});
  const options = Object.assign(document.createElement("div"), {id: "method-options"});
  box.append(row, options);
  row.querySelector("select").addEventListener("change", e => methodOptions(e.target.value));
  return box;
}

function methodOptions(name) {
  const box = $("#method-options"), schema = state.methods[name];
  box.innerHTML = "";
  for (const [field, prop] of Object.entries(schema.properties)) {
    if (field !== "name") box.append(fieldRow("method." + field, prop, false));
  }
}

function setValue(input, value) {
  const kind = input.dataset.kind;
  if (kind === "bool") input.checked = !!value;
  else if (kind === "array") input.value = (value || []).map(v => typeof v === "object" ? JSON.stringify(v) : v).join("\n");
  else if (value === null || value === undefined) input.value = "";
  else if (kind === "yaml" && typeof value === "object") input.value = JSON.stringify(value);
  else input.value = String(value);
}

// One `key=value` override per field: the CLI's language, so the server validates exactly as `lmtune train`.
function override(input) {
  const key = input.name, kind = input.dataset.kind, nullable = !!input.dataset.nullable;
  const text = input.value.trim();
  if (kind === "bool") return `${key}=${input.checked}`;
  if (kind === "enum") return `${key}=${JSON.stringify(input.value)}`;
  if (kind === "array") {
    const items = input.value.split("\n").map(l => l.trim()).filter(Boolean).map(l => {
      try { return l.startsWith("{") ? JSON.parse(l) : l; } catch { return l; }
    });
    return !items.length && nullable ? `${key}=` : `${key}=${JSON.stringify(items)}`;
  }
  if (kind === "string") return text === "" && nullable ? `${key}=` : `${key}=${JSON.stringify(input.value)}`;
  return `${key}=${text}`;  // numbers and free YAML, parsed by the server
}

function overrides() { return $$("#form-fields [name]").filter(i => i.dataset.kind !== "const").map(override); }

function showErrors(errors) {
  $$("#config-form .field .error").forEach(e => { e.textContent = ""; });
  $$("#config-form .invalid").forEach(e => e.classList.remove("invalid"));
  const general = [];
  for (const {field, message} of errors || []) {
    let key = field, row = null;
    while (key && !(row = $(`#form-fields .field[data-key="${CSS.escape(key)}"]`))) key = key.split(".").slice(0, -1).join(".");
    if (row) { row.querySelector(".error").textContent = message; row.querySelector("[name]").classList.add("invalid"); }
    else general.push(message);
  }
  $("#form-errors").textContent = general.join("\n");
}

let formTimer = null;
function formChanged() { clearTimeout(formTimer); formTimer = setTimeout(checkForm, 350); }

async function checkForm() {
  const seq = ++state.estimateSeq, body = {overrides: overrides()};
  let errors = [];
  try { $("#yaml-preview").textContent = (await api("validate", body)).yaml; }
  catch (err) { errors = err.errors; $("#yaml-preview").textContent = ""; }
  if (seq !== state.estimateSeq) return;
  showErrors(errors);
  // The estimate reads no data: only the other fields must be right.
  if (errors.some(e => e.field !== "data" && !e.field.startsWith("data.train"))) {
    $("#estimate").innerHTML = '<p class="help">fix the marked fields to see the estimate</p>';
    return;
  }
  if (!$("#estimate-status")) $("#estimate").insertAdjacentHTML("afterbegin", '<p id="estimate-status" class="help">estimating…</p>');
  try {
    const est = await api("estimate", body);
    if (seq === state.estimateSeq) showEstimate(est);
  } catch (err) {
    if (seq !== state.estimateSeq) return;
    showErrors([...errors, ...err.errors]);
    $("#estimate").innerHTML = `<p class="error">${esc(err.message)}</p>`;
  }
}

const GIB = 2 ** 30;
function showEstimate(est) {
  const parts = [["weights", est.weights], ["gradients", est.gradients], ["optimizer states", est.optimizer],
    ["activations", est.activations], ["overhead", est.overhead]];
  const total = est.per_device, scale = Math.max(total, est.available);
  const gib = n => (n / GIB).toFixed(3) + " GiB";
  $("#estimate").innerHTML = `
    <div class="bar">${parts.map(([, n], i) => `<div style="width:${100 * n / scale}%;background:${COLORS[i]}"></div>`).join("")}</div>
    <table>
      ${parts.map(([name, n], i) => `<tr><td><span class="swatch" style="background:${COLORS[i]}"></span>${name}</td><td>${gib(n)}</td></tr>`).join("")}
      <tr><th>peak per device</th><th id="estimate-peak" data-bytes="${total}">${gib(total)}</th></tr>
      <tr><td>available on ${esc(est.device)}</td><td>${gib(est.available)}</td></tr>
      <tr><td>parameters</td><td>${est.trainable_params.toLocaleString()} trainable of ${est.total_params.toLocaleString()}</td></tr>
    </table>
    <p class="help">${esc(est.plan.batch_size)} × ${esc(est.plan.seq_len)} tokens, ${esc(est.plan.precision)}; sequences padded to data.max_length, every position labelled (the worst case)</p>
    ${est.warning ? `<div class="warn" id="estimate-warning">${esc(est.warning)}</div>` : ""}
    ${(est.notes || []).map(n => `<p class="help">note: ${esc(n)}</p>`).join("")}`;
}

async function buildForm() {
  const data = await api("schema");
  state.schema = data.config; state.methods = data.methods; state.methodDefault = data.method_default;
  const box = $("#form-fields");
  box.innerHTML = "";
  const order = ["model", "method", "task", "data", "train", "preference", "grpo"];
  const top = {type: "object", properties: {}, required: state.schema.required};
  const rest = {type: "object", properties: {}};
  for (const [name, prop] of Object.entries(state.schema.properties)) {
    (order.includes(name) ? top : rest).properties[name] = prop;
  }
  top.properties = Object.fromEntries(order.filter(n => n in top.properties).map(n => [n, top.properties[n]]));
  box.append(...[...section(top, "", "run", state.schema.description).children].filter(e => e.tagName !== "LEGEND"));
  box.append(section(rest, "", "output", "where the run writes, and what it may replace"));
  methodOptions(state.methodDefault);
  box.addEventListener("input", formChanged);
  box.addEventListener("change", formChanged);
}

async function loadValues(values) {
  const name = $('[name="method.name"]');
  name.value = values["method.name"];
  methodOptions(name.value);
  for (const [key, value] of Object.entries(values)) {
    const input = $(`#form-fields [name="${CSS.escape(key)}"]`);
    if (input && key !== "method.name") setValue(input, value);
  }
  formChanged();
}

$("#load-yaml").addEventListener("change", async e => {
  const file = e.target.files[0];
  if (!file) return;
  try { await loadValues((await api("load_yaml", {text: await file.text()})).values); showErrors([]); }
  catch (err) { showErrors(err.errors); }
  e.target.value = "";
});

$("#save-yaml").addEventListener("click", async () => {
  try {
    const {yaml} = await api("validate", {overrides: overrides()});
    const a = Object.assign(document.createElement("a"), {href: URL.createObjectURL(new Blob([yaml], {type: "text/yaml"})),
      download: "run.yaml"});
    a.click();
  } catch (err) { showErrors(err.errors); }
});

$("#launch").addEventListener("click", async () => {
  $("#launch-message").textContent = "";
  try {
    const run = await api("launch", {overrides: overrides()});
    state.selectedRun = run.dir;
    showPage("runs");
  } catch (err) { showErrors(err.errors); $("#launch-message").innerHTML = `<p class="error">${esc(err.message)}</p>`; }
});

// ---- runs ---------------------------------------------------------------------------------------------------
function runItem(run, onClick) {
  const li = document.createElement("li");
  li.dataset.dir = run.dir;
  li.innerHTML = `<span>${esc(run.name)}</span><span class="status ${esc(run.status)}">${esc(run.status)}</span>`;
  li.addEventListener("click", onClick);
  return li;
}

async function refreshRuns() {
  const {runs} = await api("runs");
  const list = $("#run-list");
  list.replaceChildren(...runs.map(r => runItem(r, () => { state.selectedRun = r.dir; refreshRuns(); })));
  $$("li", list).forEach(li => li.classList.toggle("selected", li.dataset.dir === state.selectedRun));
  if (state.selectedRun) await showRun(state.selectedRun);
}

async function showRun(dir) {
  const run = await api("run?dir=" + encodeURIComponent(dir));
  const box = $("#run-detail");
  if (!$("#run-chart", box) || box.dataset.dir !== dir) {
    box.dataset.dir = dir;
    box.innerHTML = `<h2 id="run-title"></h2><div id="run-progress"></div><div id="run-message" class="error"></div>
      <div class="buttons"><button id="run-stop">Stop (keeps a checkpoint)</button></div>
      <h3>Loss</h3><div id="run-chart"></div><h3>Log</h3><pre id="run-log"></pre>`;
    $("#run-stop").addEventListener("click", async () => {
      try { await api("stop", {dir}); } catch (err) { $("#run-message").textContent = err.message; }
    });
  }
  $("#run-title").innerHTML = `${esc(run.name)} <span class="status ${run.status}" id="run-status">${run.status}</span>`;
  const [done, total] = run.progress || [0, 0];
  $("#run-progress").innerHTML = total ? `<div class="progress"><div style="width:${100 * done / total}%"></div></div>
    <span class="help">step ${done} of ${total}${run.checkpoints.length ? "; checkpoints: " + run.checkpoints.join(", ") : ""}</span>` : "";
  $("#run-message").textContent = run.status === "running" ? "" : run.message;
  $("#run-stop").disabled = run.status !== "running";
  lineChart($("#run-chart"), [
    {label: "train loss", points: run.rows.filter(r => "loss" in r).map(r => [r.step, r.loss])},
    {label: "eval loss", points: run.rows.filter(r => "eval_loss" in r).map(r => [r.step, r.eval_loss])}]);
  const log = $("#run-log"), atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = run.log;
  if (atEnd) log.scrollTop = log.scrollHeight;
}

setInterval(() => { if ($("#page-runs").classList.contains("active")) refreshRuns().catch(() => {}); }, 1000);

// ---- chat ---------------------------------------------------------------------------------------------------
async function refreshChatRuns() {
  const {runs} = await api("runs"), select = $("#chat-run"), before = select.value;
  select.replaceChildren(...runs.filter(r => r.status === "finished").map(r => new Option(r.name, r.dir)));
  if (before) select.value = before;
}

function showChat() {
  for (const [kind, box] of [["run", "#chat-run-out"], ["base", "#chat-base"]]) {
    $(box).replaceChildren(...state.chat[kind].map(m =>
      Object.assign(document.createElement("div"), {className: "msg " + m.role, textContent: m.content})));
  }
}

async function sendChat() {
  const text = $("#chat-text").value.trim(), dir = $("#chat-run").value;
  $("#chat-error").textContent = "";
  if (!text) return;
  if (!dir) { $("#chat-error").textContent = "no finished run yet: launch one, or pick one"; return; }
  for (const kind of ["run", "base"]) state.chat[kind].push({role: "user", content: text});
  $("#chat-text").value = "";
  showChat();
  $("#chat-send").disabled = true;
  try {
    const answers = await api("chat", {dir, history: state.chat, max_new_tokens: Number($("#chat-max").value) || 48});
    for (const kind of ["run", "base"]) state.chat[kind].push({role: "assistant", content: answers[kind]});
  } catch (err) {
    for (const kind of ["run", "base"]) state.chat[kind].pop();
    $("#chat-error").textContent = err.message;
  }
  $("#chat-send").disabled = false;
  showChat();
}
$("#chat-send").addEventListener("click", sendChat);
$("#chat-text").addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendChat(); } });
$("#chat-reset").addEventListener("click", () => { state.chat = {run: [], base: []}; showChat(); });
$("#chat-run").addEventListener("change", () => { state.chat = {run: [], base: []}; showChat(); });

// ---- compare ------------------------------------------------------------------------------------------------
async function refreshCompareList() {
  const {runs} = await api("runs"), list = $("#compare-list");
  const picked = new Set($$("input:checked", list).map(i => i.value));
  list.replaceChildren(...runs.map(r => {
    const li = document.createElement("li");
    li.innerHTML = `<label><input type="checkbox" value="${esc(r.dir)}" ${picked.has(r.dir) ? "checked" : ""}> ${esc(r.name)}</label>
      <span class="status ${esc(r.status)}">${esc(r.status)}</span>`;
    return li;
  }));
  list.onchange = compare;
}

async function compare() {
  const dirs = $$("#compare-list input:checked").map(i => i.value);
  const {runs} = await api("compare?" + dirs.map(d => "dir=" + encodeURIComponent(d)).join("&"));
  const num = (v, digits = 4) => v === null || v === undefined ? "–" : Number(v).toPrecision(digits);
  $("#compare-table").innerHTML = `<table id="compare-rows"><tr><th>run</th><th>method</th><th>model</th>
    <th>trainable params</th><th>steps</th><th>s / step</th><th>final loss</th><th>eval loss</th></tr>
    ${runs.map(r => `<tr><td>${esc(r.name)}</td><td>${esc(r.method || "?")}</td><td>${esc(r.model)}</td>
      <td>${r.trainable_params === null ? "–" : r.trainable_params.toLocaleString() + (r.total_params ? ` (${(100 * r.trainable_params / r.total_params).toFixed(2)}%)` : "")}</td>
      <td>${r.steps ?? "–"}</td><td>${num(r.s_per_step, 3)}</td><td>${num(r.loss)}</td><td>${num(r.eval_loss)}</td></tr>`).join("")}</table>`;
  const series = [];
  runs.forEach((r, i) => {
    const color = COLORS[i % COLORS.length];
    series.push({label: r.name, color, points: r.rows.filter(x => "loss" in x).map(x => [x.step, x.loss])});
    const evals = r.rows.filter(x => "eval_loss" in x).map(x => [x.step, x.eval_loss]);
    if (evals.length) series.push({label: r.name + " (eval)", color, dashed: true, points: evals});
  });
  lineChart($("#compare-chart"), series);
}

buildForm().then(formChanged).catch(err => { $("#form-fields").textContent = "cannot load the schema: " + err.message; });
