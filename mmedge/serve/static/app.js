// The page of `mmedge serve`: pick or drop an image, caption it or ask about it (the answer streams in over
// /v1/chat/completions), and score labels with a CLIP model (/v1/classify). Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP_K = 5; // the bars shown: the best TOP_K labels, and the page says of how many
// An HTTP header holds Latin-1 only, and API keys are ASCII: anything else makes fetch() throw before sending.
const ASCII_KEY = /^[\x20-\x7e]*$/;
const page = {
  image: null,
  reads: 0, // numbers each file read: only the latest one's result is used
  key: sessionStorage.getItem("mmedge-key") || "",
  models: [],
  typedLabels: "", // what the user typed for a model without baked labels, kept while a baked one is shown
  busy: { caption: false, classify: false }, // one request per panel at a time: a second would mix its answer in
  running: { caption: null, classify: null }, // each running request's AbortController
};
const PANELS = {
  caption: { select: "captioner", buttons: ["caption-button", "ask-button"], note: "caption-note",
             error: "caption-error", model: "the caption model", output: () => $("answer"),
             none: "no served model answers captions or questions (serve a BLIP-2 or IDEFICS artifact for them)" },
  classify: { select: "classifier", buttons: ["classify-button"], note: "classify-note",
              error: "classify-error", model: "the classifier model", output: () => $("bars"),
              none: "no served model classifies images (serve a CLIP artifact for it)" },
};

function headers() {
  if (!ASCII_KEY.test(page.key)) throw new Error("the API key has characters other than ASCII: enter it again");
  const h = { "Content-Type": "application/json" };
  if (page.key) h["Authorization"] = `Bearer ${page.key}`;
  return h;
}

// An error in its place: "page" (the model list, at the top), "image", or a panel ("caption", "classify"). Each
// place is cleared only by its own next action, so one panel's request never erases the other's error.
const ERRORS = { page: "error", image: "image-error", caption: "caption-error", classify: "classify-error" };

function showError(where, message, key = false) {
  const box = $(ERRORS[where]);
  box.textContent = message || "";
  box.hidden = !message;
  box.dataset.key = key ? "true" : ""; // the API key was refused: said until a key is taken
  if (message) box.scrollIntoView({ block: "nearest" }); // on a phone the panel may be scrolled away from it
}

// The request's field that an error names (its `param`), in the page's words: the input the user filled.
function fieldName(param, panel, sent) {
  if (!param) return "";
  if (/^(messages\[\d+\]\.content\[\d+\]\.image_url|images\[\d+\])/.test(param)) return "the image";
  if (/^messages\[\d+\]\.content\[\d+\]\.text$/.test(param)) return "the question";
  if (param === "model") return PANELS[panel] ? PANELS[panel].model : "the model";
  const label = /^labels\[(\d+)\]$/.exec(param);
  if (label && sent && sent.labels) {
    const typed = sent.labels[Number(label[1])];
    if (typed) return `label ${typed.position} '${typed.text}'`;
  }
  if (param === "labels" || param.startsWith("labels[")) return "the labels";
  return "";
}

// An error's words: mmedge sends {"error": {"message": ..., "param": ...}}; a proxy in front may send {"error": "..."}.
// Where the error names a field the page filled, the page says which input that is, ahead of the server's words.
function errorText(error, status, panel, sent) {
  const message = (typeof error === "string" ? error : error && error.message)
    || (status ? `HTTP ${status}` : "the server reported an error without a message");
  if (status === 401) return `the API key was refused: enter the right one in the API key box at the top (${message})`;
  const field = fieldName(error && typeof error === "object" ? error.param : null, panel, sent);
  return field ? `${field[0].toUpperCase()}${field.slice(1)}: ${message}` : message;
}

// A refused request as an Error to throw, with what the page does about it: a 401 opens the key form (and the error
// goes once a key is taken), a model no longer served (404 model_not_found) makes the page list the models again.
async function refused(response, panel, sent) {
  const error = new Error(await refusal(response, panel, sent));
  error.key = response.status === 401;
  return error;
}

async function refusal(response, panel, sent) {
  if (response.status === 401) {
    askForKey(page.key ? "the API key was refused: enter the right one" : "this server needs an API key");
  }
  let error = null;
  try {
    error = (await response.json()).error;
  } catch (_) {
    return `HTTP ${response.status}`;
  }
  let text = errorText(error, response.status, panel, sent);
  if (response.status === 404 && error && error.code === "model_not_found") {
    loadModels().catch((e) => showError("page", plain(e)));
    text += " (the list of models was loaded again: pick one that is served)";
  }
  return text;
}

// What went wrong, in words: fetch() and a stream's read() reject with a TypeError when the connection fails.
function plain(error) {
  if (error instanceof TypeError) {
    return `the connection to the server was lost (${error.message}): ` +
      "check that mmedge serve is running, then try again";
  }
  if (error instanceof SyntaxError) return `the server sent a reply that is not JSON (${error.message})`;
  return error && error.message ? error.message : String(error);
}

// A request refused with 401, or a key that cannot be used: the key form opens again, with the cursor in it.
function askForKey(reason) {
  $("key-form").hidden = false;
  $("status").textContent = reason;
  $("key").focus();
}

// The models, listed again; `submitted`: a key was just entered, so any failure opens the key form again.
async function loadModels(submitted = false) {
  const failed = (message) => {
    $("status").textContent = "the models could not be listed";
    showError("page", message);
    if (submitted) askForKey("the models could not be listed with this key: check it, or try again");
  };
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    return failed(plain(e));
  }
  if (response.status === 401) {
    return askForKey(page.key ? "the API key was refused: enter the right one" : "this server needs an API key");
  }
  if (!response.ok) return failed(await refusal(response, "page"));
  try {
    page.models = (await response.json()).data;
  } catch (e) {
    return failed(plain(e));
  }
  showError("page", "");
  for (const panel of Object.keys(PANELS)) if ($(PANELS[panel].error).dataset.key) showError(panel, "");
  $("key-form").hidden = true;
  fill("caption", page.models.filter((m) => m.endpoints.includes("/v1/chat/completions")));
  fill("classify", page.models.filter((m) => m.endpoints.includes("/v1/classify")));
  $("status").textContent = `${page.models.length} model(s): ${page.models.map((m) => m.id).join(", ")}`;
  showLabels();
}

// A panel's model choice, listed again: the model chosen stays chosen while it is still served.
function fill(panel, models) {
  const select = $(PANELS[panel].select);
  const chosen = select.value;
  select.replaceChildren(...models.map((m) => new Option(`${m.id} (${m.family})`, m.id)));
  if (models.some((m) => m.id === chosen)) select.value = chosen;
  // another model is chosen now: the last results were not its own (an error, saying why, stays)
  else if (chosen && !page.busy[panel] && PANELS[panel].output().dataset.state === "done") clearResults(panel);
  $(PANELS[panel].note).textContent = models.length ? "" : PANELS[panel].none;
  controls(panel);
}

// Buttons and the model choice are off while the panel's request runs, and for good when no served model fits it;
// Ask is off until there is a question to ask.
function controls(panel) {
  const { select, buttons } = PANELS[panel];
  const none = $(select).options.length === 0;
  $(select).disabled = none || page.busy[panel];
  for (const id of buttons) $(id).disabled = none || page.busy[panel];
  if (panel === "caption") {
    const question = Boolean($("question").value.trim());
    if (!question) $("ask-button").disabled = true;
    $("ask-button").title = question ? "" : "type a question first";
  }
}

function setBusy(panel, busy) {
  page.busy[panel] = busy;
  controls(panel);
}

// A panel's results and error, gone: they belonged to an image or a model no longer chosen. A request still running
// for them is stopped.
function clearResults(panel) {
  if (page.running[panel]) page.running[panel].abort();
  showError(panel, "");
  if (panel === "caption") {
    $("answer").textContent = "";
    $("answer").dataset.state = "idle";
    delete $("answer").dataset.partial;
    $("answer-info").textContent = "";
  } else {
    $("bars").replaceChildren();
    $("bars").dataset.state = "idle";
    $("bars-info").textContent = "";
  }
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

// --- the image ---------------------------------------------------------------------------------------------------
// The image in use: `url` a data URI, or null for none; `shown` false for one the browser cannot draw (TIFF).
function setImage(url, name, shown) {
  page.image = url;
  for (const panel of Object.keys(PANELS)) clearResults(panel); // the results were the last image's
  const preview = $("preview");
  if (url && shown) {
    preview.src = url;
    preview.alt = `the chosen image, ${name}`;
  } else {
    preview.removeAttribute("src");
    preview.alt = "";
  }
  preview.hidden = !(url && shown);
  $("drop-hint").hidden = Boolean(url && shown);
  $("image-note").textContent = url && !shown
    ? `${name}: no preview (this browser cannot draw this format; the server reads it)` : "";
  $("image-panel").dataset.image = url ? "ready" : "none";
}

// TIFF, which the server reads and Chromium and Firefox do not draw: its first bytes, from the data URI.
function isTiff(url) {
  const start = url.indexOf(",") + 1;
  try {
    const bytes = atob(url.slice(start, start + 8));
    return bytes.startsWith("II*\0") || bytes.startsWith("MM\0*");
  } catch (_) {
    return false;
  }
}

function refuseImage(message) {
  setImage(null);
  $("image-panel").dataset.image = "refused";
  showError("image", message);
}

// A picked or dropped file (a drop bypasses the input's accept="image/*"): used when the browser decodes it as an
// image (or it is a TIFF, which the server reads), else refused with words. Only the latest file picked counts: an
// earlier, slower read that ends later is dropped.
function readImage(file) {
  const read = ++page.reads;
  const latest = () => read === page.reads;
  showError("image", "");
  if (!file) return setImage(null);
  const name = file.name || "the file";
  if (file.size === 0) return refuseImage(`${name} is empty (0 bytes): pick an image file`);
  if (file.type && !file.type.startsWith("image/")) {
    return refuseImage(`${name} is not an image (its type is ${file.type}): pick a PNG, JPEG, WebP, GIF, BMP or TIFF`);
  }
  $("image-panel").dataset.image = "reading";
  const reader = new FileReader();
  reader.onload = () => {
    if (!latest()) return;
    const url = reader.result; // a data URI: data:image/png;base64,...
    const decoded = new Image();
    decoded.onload = () => { if (latest()) setImage(url, name, true); };
    decoded.onerror = () => {
      if (!latest()) return;
      if (isTiff(url)) return setImage(url, name, false);
      refuseImage(`${name} could not be read as an image (it is not one, or it is damaged): pick a PNG, JPEG, WebP, `
        + "GIF, BMP or TIFF");
    };
    decoded.src = url;
  };
  reader.onerror = () => {
    if (latest()) refuseImage(`${name} could not be read (${reader.error ? reader.error.message : "unknown error"})`);
  };
  reader.readAsDataURL(file);
}

// --- requests ----------------------------------------------------------------------------------------------------
// One request of a panel: none while another of its own runs; its output element's state ends "done" or "error" (with
// the words shown in the panel), and the panel's buttons come back either way. A request stopped because its image or
// model changed ends quietly ("idle", its results already cleared).
async function request(panel, output, work) {
  if (page.busy[panel]) return;
  showError(panel, "");
  if (!page.image) return showError(panel, "pick an image first");
  const controller = new AbortController();
  page.running[panel] = controller;
  setBusy(panel, true);
  try {
    await work(controller.signal);
    output.dataset.state = "done";
  } catch (e) {
    if (controller.signal.aborted) {
      output.dataset.state = "idle";
    } else {
      output.dataset.state = "error";
      showError(panel, plain(e), Boolean(e && e.key));
    }
  } finally {
    if (page.running[panel] === controller) page.running[panel] = null;
    setBusy(panel, false);
  }
}

function generate(question) {
  const answer = $("answer");
  return request("caption", answer, async (signal) => {
    answer.textContent = "";
    answer.dataset.state = "streaming";
    delete answer.dataset.partial;
    $("answer-info").textContent = "";
    try {
      await streamAnswer(question, answer, signal);
    } catch (e) {
      if (answer.textContent && !signal.aborted) { // text arrived, then the answer broke off: it is only a beginning
        answer.dataset.partial = "true";
        $("answer-info").textContent = "cut short: the text above is only the beginning of the answer";
      }
      throw e;
    }
  });
}

async function streamAnswer(question, answer, signal) {
  const content = [{ type: "image_url", image_url: { url: page.image } }];
  if (question) content.push({ type: "text", text: question });
  const started = performance.now();
  let firstAt = null;
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(),
    signal,
    body: JSON.stringify({ model: $("captioner").value, stream: true, stream_options: { include_usage: true },
                           messages: [{ role: "user", content }] }),
  });
  if (!response.ok) throw await refused(response, "caption");
  const type = response.headers.get("content-type") || "";
  if (!type.startsWith("text/event-stream")) {
    throw new Error(`the server answered with ${type.split(";")[0] || "no content type"} instead of an event stream `
      + "(is something other than mmedge serve, such as a proxy, answering at this address?)");
  }
  let usage = null;
  let finished = false;
  for await (const data of events(response)) {
    if (data === "[DONE]") {
      finished = true;
      break;
    }
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(errorText(chunk.error, null, "caption"));
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
  // what it answers, said: the question box may be edited (for the next question) while this answer stays shown
  const what = question ? `answer to "${question}"` : "caption";
  $("answer-info").textContent = `${what}: ${first}done after ${Math.round(performance.now() - started)} ms`
    + `${tokens}${empty}`;
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

// The labels as typed: the non-empty ones, each with its place among the comma-separated entries the user typed (the
// server's labels[i] counts the non-empty ones only).
function typedLabels() {
  return $("labels").value.split(",").map((text, i) => ({ text: text.trim(), position: i + 1 }))
    .filter((l) => l.text);
}

function classify() {
  const bars = $("bars");
  return request("classify", bars, async (signal) => {
    bars.replaceChildren(); // a failed request must not leave the last answer's bars, looking like its own
    bars.dataset.state = "running";
    $("bars-info").textContent = "";
    const model = chosenClassifier();
    const baked = Boolean(model && model.labels);
    const labels = baked ? model.labels.map((text, i) => ({ text, position: i + 1 })) : typedLabels();
    const send = !baked && labels.length > 0;
    const response = await fetch("/v1/classify", {
      method: "POST",
      headers: headers(),
      signal,
      body: JSON.stringify({ model: $("classifier").value, images: [page.image], top_k: TOP_K,
                             ...(send ? { labels: labels.map((l) => l.text) } : {}) }),
    });
    if (!response.ok) throw await refused(response, "classify", { labels });
    const predictions = (await response.json()).data[0].predictions;
    bars.replaceChildren(...predictions.map(bar));
    const total = labels.length || predictions.length;
    $("bars-info").textContent = predictions.length < total
      ? `the top ${predictions.length} of ${total} labels` : `all ${total} labels`;
  });
}

function bar(prediction) {
  const row = document.createElement("div");
  row.className = "bar-row";
  row.dataset.label = prediction.label;
  row.dataset.score = String(prediction.score); // the exact score; the text shows it rounded
  const name = document.createElement("span");
  name.className = "label";
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
    if (e.dataTransfer.files.length) readImage(e.dataTransfer.files[0]);
  });
  // a file dropped beside the drop zone would make the browser open it in place of the page
  for (const type of ["dragover", "drop"]) document.addEventListener(type, (e) => e.preventDefault());
  const shown = (panel) => (promise) => promise.catch((e) => showError(panel, plain(e)));
  const ask = () => {
    const question = $("question").value.trim();
    if (question) shown("caption")(generate(question));
  };
  $("caption-button").addEventListener("click", () => shown("caption")(generate("")));
  $("ask-button").addEventListener("click", ask);
  $("question").addEventListener("input", () => controls("caption"));
  $("question").addEventListener("keydown", (e) => {
    // Enter that ends an input method's composition (Japanese, Chinese, ...) picks the text; it does not ask
    if (e.key === "Enter" && !e.isComposing && e.keyCode !== 229 && !$("ask-button").disabled) ask();
  });
  $("captioner").addEventListener("change", () => clearResults("caption"));
  $("classify-button").addEventListener("click", () => shown("classify")(classify()));
  $("classifier").addEventListener("change", () => { clearResults("classify"); showLabels(); });
  $("labels").addEventListener("input", () => { if (!$("labels").readOnly) page.typedLabels = $("labels").value; });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key").value.trim();
    if (!ASCII_KEY.test(key)) {
      return askForKey("an API key is ASCII letters, digits and symbols: this one has other characters "
        + "(a keyboard layout other than the key's?)");
    }
    page.key = key;
    sessionStorage.setItem("mmedge-key", page.key);
    $("key-form").hidden = true;
    $("status").textContent = "loading the models…";
    loadModels(true).catch((error) => {
      showError("page", plain(error));
      askForKey("the models could not be listed with this key: check it, or try again");
    });
  });
  for (const panel of Object.keys(PANELS)) controls(panel);
  if (!ASCII_KEY.test(page.key)) { // kept from an earlier page that took any key
    page.key = "";
    sessionStorage.removeItem("mmedge-key");
  }
  loadModels().catch((e) => showError("page", plain(e)));
}

setUp();
