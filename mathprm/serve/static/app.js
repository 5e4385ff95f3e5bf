// The mathprm page. Solve: POST v1/chat/completions with stream: true and read its server-sent
// events with a fetch reader (EventSource can neither POST nor send the Authorization header),
// showing each decided step, its score and its rejected candidates as they come. Labels: the
// tree-search label datasets that GET v1/labels lists, one problem's labelled steps at a time.
// Every URL is relative (the page may live under a route prefix), and text from the server is
// only ever set as text, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "mathprm.apiKey"; // sessionStorage: the key lives as long as the tab

// ---------------------------------------------------------------------------- talking to the server

class ServerError extends Error {}

function errorText(status, body) {
  // The app's error form {error: "...", field} or OpenAI's {error: {message, param}}.
  if (status === 401) {
    return "this server needs an API key: " +
      (sessionStorage.getItem(KEY) ? "the one given was refused" : "enter it above");
  }
  const e = body && body.error;
  return (typeof e === "string" ? e : e && e.message) || `the server answered HTTP ${status}`;
}

async function call(path, options = {}) {
  const headers = { ...options.headers };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const r = await fetch(path, { ...options, headers });
  if (!r.ok) {
    const body = await r.json().catch(() => null);
    throw new ServerError(errorText(r.status, body));
  }
  return r;
}

const getJSON = async (path) => (await call(path)).json();

function notify(message) {
  $("notice").textContent = message || "";
  $("notice").hidden = !message;
}

// Bumped when the key changes: what a request sent with an older key answers arrives late and
// must not overwrite what the newer key got (a 401 notice after the right key was entered).
let keyVersion = 0;

// Runs `work`, showing what went wrong in the notice instead of failing silently.
async function guarded(work) {
  const version = keyVersion;
  try {
    await work();
  } catch (e) {
    if (version === keyVersion) notify(e instanceof ServerError ? e.message : `failed: ${e.message}`);
  }
}

// The events of a server-sent event stream: the JSON of each `data:` block, until [DONE].
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const blocks = buffer.split(/\r?\n\r?\n/);
    buffer = blocks.pop(); // the block still arriving
    for (const block of blocks) {
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// ---------------------------------------------------------------------------- small views

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A score in [0, 1] as a bar and its value; "no score" where there is none (no PRM).
function scoreView(score) {
  const box = el("span", "score");
  if (score === null || score === undefined) {
    box.append(el("span", "muted", "no score"));
    return box;
  }
  const bar = el("meter");
  Object.assign(bar, { min: 0, max: 1, low: 0.5, high: 0.8, optimum: 1, value: score }); // red, amber, green
  box.append(bar, el("span", "value", score.toFixed(3)));
  return box;
}

function option(value, text) {
  const o = el("option", null, text);
  o.value = value;
  return o;
}

// ---------------------------------------------------------------------------- models and problems

const models = new Map(); // strategy -> its N in the listed model id ("" when it takes none)

async function loadModels() {
  const version = keyVersion;
  const list = await getJSON("v1/models");
  if (version !== keyVersion) return;
  const picker = $("strategy");
  const before = picker.value;
  models.clear();
  picker.replaceChildren();
  for (const m of list.data.filter((m) => m.id.startsWith("mathprm-"))) {
    const [name, n] = m.id.slice("mathprm-".length).split("@");
    if (models.has(name) && !n) continue;
    if (!models.has(name)) picker.append(option(name, name));
    models.set(name, n || "");
  }
  if (models.has(before)) picker.value = before;
  strategyChanged();
}

function strategyChanged() {
  const n = models.get($("strategy").value) || "";
  $("n").disabled = !n; // a strategy listed without @N takes none (greedy)
  $("n").placeholder = n || "-";
  if (!n) $("n").value = "";
}

function modelId() {
  const name = $("strategy").value;
  const n = $("n").value.trim() || models.get(name);
  return `mathprm-${name}${n ? `@${n}` : ""}`;
}

let problems = []; // the dataset's problems, fetched once
let nextProblem = 0;
let gold = null; // {id, question, answer} of the problem in the question box, if it came from the dataset

async function pickProblem() {
  if (!problems.length) problems = (await getJSON("v1/problems?limit=20")).data;
  if (!problems.length) throw new ServerError("the server's dataset has no problems");
  gold = problems[nextProblem++ % problems.length];
  $("question").value = gold.question;
  showGold();
}

function showGold() {
  $("gold").hidden = !gold;
  if (gold) {
    $("problem-id").textContent = gold.id;
    $("gold-answer").textContent = gold.answer === null ? "none" : gold.answer;
  }
}

function questionEdited() {
  if (gold && $("question").value !== gold.question) {
    gold = null; // an edited question is no longer the dataset's: its gold answer does not apply
    showGold();
  }
}

// ---------------------------------------------------------------------------- the solve view

function stepView(step, candidates) {
  const li = el("li", "step");
  li.dataset.index = step.index;
  li.append(el("pre", "text", step.text), scoreView(step.score));
  if (candidates.length) {
    const details = el("details", "candidates");
    const rejected = candidates.filter((c) => !c.chosen).length;
    details.append(el("summary", null, `${candidates.length} candidates (${rejected} rejected)`));
    const list = el("ul");
    for (const c of candidates) {
      const item = el("li", c.chosen ? "candidate chosen" : "candidate");
      item.append(scoreView(c.score), el("pre", "text", c.text));
      if (c.chosen) item.append(el("span", "badge", "chosen"));
      if (c.finished) item.append(el("span", "badge", "ends the solution"));
      list.append(item);
    }
    details.append(list);
    li.append(details);
  }
  return li;
}

function showFinal(result, goldAnswer, finishReason) {
  if (!$("steps").children.length) {
    // Strategies that stream no step (an empty solution) still end with their steps.
    result.steps.forEach((s, index) => $("steps").append(stepView({ ...s, index }, [])));
  }
  $("answer").textContent = result.answer === null ? "none found" : result.answer;
  const check = $("check");
  check.className = result.correct === true ? "right" : result.correct === false ? "wrong" : "";
  check.textContent = result.correct === true ? "\u2713 matches the gold answer"
    : result.correct === false ? `\u2717 the gold answer is ${goldAnswer}` : "";
  const usage = Object.entries(result.usage || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  const cut = finishReason === "length" ? " (cut short: max_steps or a token limit)" : "";
  $("cost").textContent = `${result.strategy}${cut}, ${result.latency_ms} ms; ${usage}`;
  $("final").hidden = false;
}

async function solve(event) {
  event.preventDefault();
  notify("");
  $("steps").replaceChildren();
  $("final").hidden = true;
  const body = { model: modelId(), messages: [{ role: "user", content: $("question").value }], stream: true };
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (gold && gold.answer !== null) body.gold_answer = gold.answer;
  $("solve").disabled = true;
  $("status").textContent = `searching with ${body.model}\u2026`;
  try {
    const r = await call("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    for await (const chunk of sseData(r.body)) {
      if (chunk.error) throw new ServerError(errorText(0, chunk));
      const ext = chunk.mathprm;
      if (ext && ext.step) $("steps").append(stepView(ext.step, ext.candidates || []));
      else if (ext && "answer" in ext) showFinal(ext, body.gold_answer, chunk.choices[0].finish_reason);
    }
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = "";
    throw e;
  } finally {
    $("solve").disabled = false;
  }
}

// ---------------------------------------------------------------------------- the labels view

const query = (params) => new URLSearchParams(params).toString();

async function loadLabelDatasets() {
  const list = (await getJSON("v1/labels")).data;
  $("label-dataset").replaceChildren(...list.map((d) => option(d.path, `${d.path} (${d.files} files)`)));
  if (!list.length) {
    $("label-problem").replaceChildren();
    $("label-table").tBodies[0].replaceChildren();
    $("label-question").textContent = "No label datasets under this server's labels_dir.";
    return;
  }
  await loadLabelProblems();
}

const MAX_LISTED = 10000; // problems the select lists; a dataset with more says how many it left out

async function loadLabelProblems() {
  const path = $("label-dataset").value;
  const list = [];
  let page = { has_more: true, total: 0 };
  while (page.has_more && list.length < MAX_LISTED) {
    page = await getJSON(`v1/labels/problems?${query({ path, offset: list.length, limit: 1000 })}`);
    if (!page.data.length) break;
    list.push(...page.data);
  }
  const options = list.map((p) => option(p.id, `${p.id} (${p.n_labels} labelled steps)`));
  if (page.total > list.length) {
    const more = option("", `... ${page.total - list.length} more problems not listed`);
    more.disabled = true;
    options.push(more);
  }
  $("label-problem").replaceChildren(...options);
  if (list.length) await loadLabelProblem();
}

async function loadLabelProblem() {
  const path = $("label-dataset").value;
  const id = $("label-problem").value;
  const problem = await getJSON(`v1/labels/problem?${query({ path, id })}`);
  $("label-question").textContent = problem.question || "(no labelled steps)";
  const rows = problem.labels.map((lab) => {
    const tr = el("tr", "label");
    const step = el("td", "steptext");
    if (lab.prefix.length) {
      const before = el("details");
      before.append(el("summary", null, `after ${lab.prefix.length} step${lab.prefix.length > 1 ? "s" : ""}`),
        el("pre", "prefix", lab.prefix.join("\n")));
      step.append(before);
    }
    step.append(el("pre", "text", lab.step));
    const score = el("td");
    score.append(scoreView(lab.score));
    tr.append(el("td", "num", lab.depth), step, score, el("td", "num", `${lab.n_correct} / ${lab.n_rollouts}`),
      el("td", null, lab.method));
    return tr;
  });
  $("label-table").tBodies[0].replaceChildren(...rows);
}

// ---------------------------------------------------------------------------- wiring

function showView(name) {
  $("view-solve").hidden = name !== "solve";
  $("view-labels").hidden = name !== "labels";
  $("tab-solve").setAttribute("aria-pressed", name === "solve");
  $("tab-labels").setAttribute("aria-pressed", name === "labels");
  notify("");
  if (name === "labels") guarded(loadLabelDatasets);
}

function keyChanged() {
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
  keyVersion += 1;
  notify("");
  guarded(loadModels);
  if (!$("view-labels").hidden) guarded(loadLabelDatasets);
}

$("api-key").value = sessionStorage.getItem(KEY) || "";
$("api-key").addEventListener("change", keyChanged);
$("tab-solve").addEventListener("click", () => showView("solve"));
$("tab-labels").addEventListener("click", () => showView("labels"));
$("strategy").addEventListener("change", strategyChanged);
$("question").addEventListener("input", questionEdited);
$("pick").addEventListener("click", () => guarded(pickProblem));
$("solve-form").addEventListener("submit", (event) => guarded(() => solve(event)));
$("label-dataset").addEventListener("change", () => guarded(loadLabelProblems));
$("label-problem").addEventListener("change", () => guarded(loadLabelProblem));
guarded(loadModels);
