// The page of `mmedge serve`: pick or drop an image, caption it or ask about it (the answer streams in over
// /v1/chat/completions), and score labels with a CLIP model (/v1/classify). Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const page = {
  image: null,
  key: sessionStorage.getItem("mmedge-key") || "",
  models: [],
  typedLabels: "", // what the user typed for a model without baked labels, kept while a baked one is shown
  busy: { caption: false, classify: false }, // one request per panel at a time: a second would mix its answer in
};
const PANELS = {
  caption: { select: "captioner", buttons: ["caption-button", "ask-button"], note: "caption-note",
             none: "no served model answers captions or questions (serve a BLIP-2 or IDEFICS artifact for them)" },
  classify: { select: "classifier", buttons: ["classify-button"], note: "classify-note",
              none: "no served model classifies images (serve a CLIP artifact for it)" },
};

function headers() {
  const h = { "Content-Type": "application/json" };
  if (page.key) h["Authorization"] = `Bearer ${page.key}`;
  return h;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// An error's words: mmedge sends {"error": {"message": ...}}; a proxy in front may send {"error": "..."}.
function errorText(error, status) {
  const message = typeof error === "string" ? error : error && error.message;
  return message || (status ? `HTTP ${status}` : "the server reported an error without a message");
}

async function failure(response) {
  try {
    return errorText((await response.json()).error, response.status);
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

// What went wrong, in words: fetch() and a stream's read() reject with a TypeError when the connection fails.
function plain(error) {
  if (error instanceof TypeError) {
    return `the connection to the server was lost (${error.message}): check that mmedge serve is running, then try again`;
  }
  if (error instanceof SyntaxError) return `the server sent a reply that is not JSON (${error.message})`;
  return error && error.message ? error.message : String(error);
}

// A request refused with 401: the key is missing or wrong; the key form opens again.
function askForKey(reason) {
  $("key-form").hidden = false;
  $("status").textContent = reason;
}

async function refused(response) {
  if (response.status === 401) {
    askForKey(page.key ? "the API key was refused: enter the right one" : "this server needs an API key");
  }
  return failure(response);
}

async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    $("status").textContent = "the models could not be listed";
    return showError(plain(e));
  }
  if (response.status === 401) {
    return askForKey(page.key ? "the API key was refused: enter the right one" : "this server needs an API key");
  }
  if (!response.ok) {
    $("status").textContent = "the models could not be listed";
    return showError(await failure(response));
  }
  page.models = (await response.json()).data;
  showError("");
  $("key-form").hidden = true;
  fill("caption", page.models.filter((m) => m.endpoints.includes("/v1/chat/completions")));
  fill("classify", page.models.filter((m) => m.endpoints.includes("/v1/classify")));
  $("status").textContent = `${page.models.length} model(s): ${page.models.map((m) => m.id).join(", ")}`;
  showLabels();
}

function fill(panel, models) {
  $(PANELS[panel].select).replaceChildren(...models.map((m) => new Option(`${m.id} (${m.family})`, m.id)));
  $(PANELS[panel].note).textContent = models.length ? "" : PANELS[panel].none;
  controls(panel);
}

// Buttons and the model choice are off while the panel's request runs, and for good when no served model fits it.
function controls(panel) {
  const { select, buttons } = PANELS[panel];
  const none = $(select).options.length === 0;
  $(select).disabled = none || page.busy[panel];
  for (const id of buttons) $(id).disabled = none || page.busy[panel];
}

function setBusy(panel, busy) {
  page.busy[panel] = busy;
  controls(panel);
}

function chosenClassifier() {
  return page.models.find((m) => m.id === $("classifier").value);
}

// A model with labels baked into its graph classifies against those: they are shown, read-only (the server refuses
// others for it). A model without them gets back what the user typed.
function showLabels() {
  const model = chosenClassifier();
  const baked = Boolean(model && model.labels);
  const box = $("labels");
  box.readOnly = baked;
  box.value = baked ? model.labels.join(", ") : page.typedLabels;
  $("labels-note").textContent = baked ? "these labels are baked into this model's graph" : "";
}

function readImage(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    page.image = reader.result; // a data URI: data:image/png;base64,...
    $("preview").src = page.image;
    $("preview").alt = `the chosen image, ${file.name}`;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
  };
  reader.readAsDataURL(file);
}

// One request of a panel: none while another of its own runs; its output element's state ends "done" or "error" (with
// the words shown), and the panel's buttons come back either way.
async function request(panel, output, work) {
  if (page.busy[panel]) return;
  if (!page.image) return showError("pick an image first");
  showError("");
  setBusy(panel, true);
  try {
    await work();
    output.dataset.state = "done";
  } catch (e) {
    output.dataset.state = "error";
    showError(plain(e));
  } finally {
    setBusy(panel, false);
  }
}

function generate(question) {
  const answer = $("answer");
  return request("caption", answer, () => {
    answer.textContent = "";
    answer.dataset.state = "streaming";
    $("answer-info").textContent = "";
    return streamAnswer(question, answer);
  });
}

async function streamAnswer(question, answer) {
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
  if (!response.ok) throw new Error(await refused(response));
  let usage = null;
  let finished = false;
  for await (const data of events(response)) {
    if (data === "[DONE]") {
      finished = true;
      break;
    }
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(errorText(chunk.error));
    if (chunk.usage) usage = chunk.usage;
    const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
    if (piece) {
      firstAt = firstAt || performance.now();
      answer.textContent += piece;
    }
  }
  if (!finished) {
    throw new Error("the answer stopped before the server ended it (the connection was cut): the text shown is "
      + "only its beginning; try again");
  }
  const count = usage ? usage.completion_tokens : 0;
  const tokens = usage ? `, ${count} token${count === 1 ? "" : "s"}` : "";
  const first = firstAt ? `first text after ${Math.round(firstAt - started)} ms, ` : "";
  // a blank answer alone would look like a fault: say that the model itself ended it (as `mmedge run` does)
  const empty = answer.textContent.trim() ? "" : ". The answer is empty: the model ended it before any text; "
    + "a prompt in the form the model was trained on gives one";
  $("answer-info").textContent = `${first}done after ${Math.round(performance.now() - started)} ms${tokens}${empty}`;
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

function classify() {
  const bars = $("bars");
  return request("classify", bars, async () => {
    bars.replaceChildren(); // a failed request must not leave the last answer's bars, looking like its own
    bars.dataset.state = "running";
    const model = chosenClassifier();
    const labels = $("labels").value.split(",").map((l) => l.trim()).filter((l) => l);
    const baked = Boolean(model && model.labels);
    const response = await fetch("/v1/classify", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model: $("classifier").value, images: [page.image], top_k: 5,
                             ...(baked || labels.length === 0 ? {} : { labels }) }),
    });
    if (!response.ok) throw new Error(await refused(response));
    const predictions = (await response.json()).data[0].predictions;
    bars.replaceChildren(...predictions.map(bar));
  });
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
  // a file dropped beside the drop zone would make the browser open it in place of the page
  for (const type of ["dragover", "drop"]) document.addEventListener(type, (e) => e.preventDefault());
  const shown = (promise) => promise.catch((e) => showError(plain(e)));
  $("caption-button").addEventListener("click", () => shown(generate("")));
  $("ask-button").addEventListener("click", () => shown(generate($("question").value.trim())));
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !$("ask-button").disabled) shown(generate($("question").value.trim()));
  });
  $("classify-button").addEventListener("click", () => shown(classify()));
  $("classifier").addEventListener("change", showLabels);
  $("labels").addEventListener("input", () => { if (!$("labels").readOnly) page.typedLabels = $("labels").value; });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    page.key = $("key").value;
    sessionStorage.setItem("mmedge-key", page.key);
    $("key-form").hidden = true;
    $("status").textContent = "loading the models…";
    shown(loadModels());
  });
  for (const panel of Object.keys(PANELS)) controls(panel);
  shown(loadModels());
}

setUp();
