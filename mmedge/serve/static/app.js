// The page of `mmedge serve`: pick or drop an image, caption it or ask about it (the answer streams in over
// /v1/chat/completions), and score labels with a CLIP model (/v1/classify). Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const page = { image: null, key: sessionStorage.getItem("mmedge-key") || "", models: [] };

function headers() {
  const h = { "Content-Type": "application/json" };
  if (page.key) h["Authorization"] = `Bearer ${page.key}`;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function failure(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : `HTTP ${response.status}`;
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("status").textContent = "this server needs an API key";
    return;
  }
  if (!response.ok) return showError(await failure(response));
  page.models = (await response.json()).data;
  fill($("captioner"), page.models.filter((m) => m.endpoints.includes("/v1/chat/completions")));
  fill($("classifier"), page.models.filter((m) => m.endpoints.includes("/v1/classify")));
  $("status").textContent = `${page.models.length} model(s): ${page.models.map((m) => m.id).join(", ")}`;
  showBakedLabels();
}

function fill(select, models) {
  select.replaceChildren(...models.map((m) => new Option(`${m.id} (${m.family})`, m.id)));
  select.disabled = models.length === 0;
}

function chosenClassifier() {
  return page.models.find((m) => m.id === $("classifier").value);
}

function showBakedLabels() {
  const model = chosenClassifier();
  if (model && model.labels) $("labels").value = model.labels.join(", ");
}

function readImage(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    page.image = reader.result; // a data URI: data:image/png;base64,...
    $("preview").src = page.image;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
  };
  reader.readAsDataURL(file);
}

async function generate(question) {
  if (!page.image) return showError("pick an image first");
  showError("");
  const answer = $("answer");
  answer.textContent = "";
  answer.dataset.state = "streaming";
  $("answer-info").textContent = "";
  const content = [{ type: "image_url", image_url: { url: page.image } }];
  if (question) content.push({ type: "text", text: question });
  const started = performance.now();
  let firstAt = null;
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({ model: $("captioner").value, stream: true, stream_options: { include_usage: true },
                           messages: [{ role: "user", content }] }),
  });
  if (!response.ok) {
    answer.dataset.state = "error";
    return showError(await failure(response));
  }
  let usage = null;
  for await (const data of events(response)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) {
      answer.dataset.state = "error";
      return showError(chunk.error.message);
    }
    if (chunk.usage) usage = chunk.usage;
    const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
    if (piece) {
      firstAt = firstAt || performance.now();
      answer.textContent += piece;
    }
  }
  const count = usage ? usage.completion_tokens : 0;
  const tokens = usage ? `, ${count} token${count === 1 ? "" : "s"}` : "";
  const first = firstAt ? `first text after ${Math.round(firstAt - started)} ms, ` : "";
  // a blank answer alone would look like a fault: say that the model itself ended it (as `mmedge run` does)
  const empty = answer.textContent.trim() ? "" : ". The answer is empty: the model ended it before any text; "
    + "a prompt in the form the model was trained on gives one";
  $("answer-info").textContent = `${first}done after ${Math.round(performance.now() - started)} ms${tokens}${empty}`;
  answer.dataset.state = "done";
}

// Server-sent events from a fetch() body: yields the data of each event.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

async function classify() {
  if (!page.image) return showError("pick an image first");
  showError("");
  const bars = $("bars");
  bars.dataset.state = "running";
  const model = chosenClassifier();
  const labels = $("labels").value.split(",").map((l) => l.trim()).filter((l) => l);
  const baked = model && model.labels && labels.join("\n") === model.labels.join("\n");
  const response = await fetch("/v1/classify", {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({ model: $("classifier").value, images: [page.image], top_k: 5,
                           ...(baked || labels.length === 0 ? {} : { labels }) }),
  });
  if (!response.ok) {
    bars.dataset.state = "error";
    return showError(await failure(response));
  }
  const predictions = (await response.json()).data[0].predictions;
  bars.replaceChildren(...predictions.map(bar));
  bars.dataset.state = "done";
}

function bar(prediction) {
  const row = document.createElement("div");
  row.className = "bar-row";
  row.dataset.label = prediction.label;
  row.dataset.score = String(prediction.score); // the exact score; the text shows it rounded
  const name = document.createElement("span");
  name.textContent = prediction.label;
  const track = document.createElement("div");
  track.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = `${(prediction.score * 100).toFixed(1)}%`;
  track.append(fill);
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = prediction.score.toFixed(3);
  row.append(name, track, score);
  return row;
}

function setUp() {
  $("file").addEventListener("change", (e) => readImage(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    readImage(e.dataTransfer.files[0]);
  });
  const shown = (promise) => promise.catch((e) => showError(String(e)));
  $("caption-button").addEventListener("click", () => shown(generate("")));
  $("ask-button").addEventListener("click", () => shown(generate($("question").value.trim())));
  $("question").addEventListener("keydown", (e) => { if (e.key === "Enter") shown(generate($("question").value.trim())); });
  $("classify-button").addEventListener("click", () => shown(classify()));
  $("classifier").addEventListener("change", showBakedLabels);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    page.key = $("key").value;
    sessionStorage.setItem("mmedge-key", page.key);
    $("key-form").hidden = true;
    shown(loadModels());
  });
  shown(loadModels());
}

setUp();
