// The chat page's logic: the conversation, streaming answers from /v1/chat/completions (SSE) with the model's
// thinking apart from its answer, tool calls and their results, per-answer TTFT and tokens/s, a stop button that
// aborts the request, and the API key asked for when the server answers 401. No framework, nothing fetched.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "dsv32.apiKey";

let apiKey = localStorage.getItem(KEY_STORAGE) || "";
let history = []; // the OpenAI messages of this conversation (earlier thinking is not sent back)
let controller = null; // the AbortController of the answer being generated

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  return headers;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

function showError(text) {
  const box = $("error");
  box.textContent = text || "";
  box.hidden = !text;
}

function askForKey() {
  const dialog = $("key-dialog");
  $("api-key").value = apiKey;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      apiKey = $("api-key").value.trim();
      localStorage.setItem(KEY_STORAGE, apiKey);
      resolve();
    }, { once: true });
    dialog.showModal();
  });
}

async function loadModels() {
  for (;;) {
    let response;
    try {
      response = await fetch("v1/models", { headers: requestHeaders() });
    } catch (error) {
      showError(`Cannot reach the server: ${error.message}`);
      return;
    }
    if (response.status === 401) {
      await askForKey();
      continue;
    }
    if (!response.ok) {
      showError(`Cannot list the models: ${await errorText(response)}`);
      return;
    }
    const select = $("model");
    select.replaceChildren();
    for (const card of (await response.json()).data) {
      select.append(new Option(card.id, card.id));
    }
    showError(select.options.length ? "" : "The server lists no model.");
    return;
  }
}

// Server-sent events of a streamed response, as parsed JSON payloads, until [DONE].
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function addBubble(role, text) {
  const bubble = element("div", `message ${role}`);
  bubble.append(element("div", "role", role));
  if (text !== undefined) bubble.append(element("div", "text", text));
  $("messages").append(bubble);
  scrollDown();
  return bubble;
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function prettyArguments(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 1);
  } catch {
    return text; // still streaming, or not JSON
  }
}

// One assistant answer on the page: thinking (collapsible), text, tool calls, stats, failure.
class AnswerView {
  constructor() {
    this.bubble = addBubble("assistant");
    this.details = element("details", "thinking");
    this.details.open = true;
    this.summary = element("summary", "", "Thinking…");
    this.thinkingText = element("div", "thinking-text");
    this.details.append(this.summary, this.thinkingText);
    this.details.hidden = true;
    this.text = element("div", "text answer");
    this.calls = element("div", "tool-calls");
    this.statsLine = element("div", "stats");
    this.bubble.append(this.details, this.text, this.calls, this.statsLine);
  }

  thinking(text) {
    this.details.hidden = false;
    this.thinkingText.textContent = text;
    scrollDown();
  }

  content(text) {
    if (this.details.open && !this.text.textContent) this.details.open = false; // the answer started: fold thinking
    this.summary.textContent = "Thinking";
    this.text.textContent = text;
    scrollDown();
  }

  toolCalls(calls) {
    this.calls.replaceChildren(...calls.map((call) => {
      const card = element("div", "tool-call");
      card.append(element("span", "name", `${call.function.name || "…"}`),
        element("span", "", `(${prettyArguments(call.function.arguments)})`));
      return card;
    }));
    scrollDown();
  }

  stats(text) {
    this.statsLine.textContent = text;
  }

  fail(text) {
    this.bubble.insertBefore(element("div", "failure", text), this.statsLine);
    scrollDown();
  }

  // Inputs for the results of the calls; `onSubmit` gets one result text per call.
  askToolResults(calls, onSubmit) {
    const inputs = calls.map((call, i) => {
      const input = element("textarea", "tool-result-input");
      input.rows = 2;
      input.placeholder = `Result of ${call.function.name}`;
      this.calls.children[i].append(input);
      return input;
    });
    const button = element("button", "send-tool-results", "Send tool results");
    button.type = "button";
    button.addEventListener("click", () => {
      button.remove();
      inputs.forEach((input) => { input.disabled = true; });
      onSubmit(inputs.map((input) => input.value));
    });
    this.calls.append(button);
  }
}

function readTools() {
  const text = $("tools").value.trim();
  if (!text) return null;
  const tools = JSON.parse(text);
  if (!Array.isArray(tools)) throw new Error("the tools must be a JSON array");
  return tools;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
}

function formatStats(tokens, exact, started, firstAt, ended, finishReason) {
  const parts = [];
  if (firstAt !== null) {
    parts.push(`${exact ? "" : "~"}${tokens} tokens`, `TTFT ${Math.round(firstAt - started)} ms`);
    const seconds = (ended - firstAt) / 1000;
    if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tok/s`);
  }
  parts.push(finishReason);
  return parts.join(" · ");
}

// Ask for the next assistant turn of `history`, streaming it onto the page.
async function generate() {
  let tools;
  try {
    tools = readTools();
  } catch (error) {
    showError(`Tools: ${error.message}`);
    return;
  }
  showError("");
  const request = {
    model: $("model").value || undefined,
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || undefined,
    temperature: $("temperature").value === "" ? undefined : Number($("temperature").value),
    chat_template_kwargs: { thinking: $("thinking").checked },
  };
  if (tools) request.tools = tools;
  const view = new AnswerView();
  const answer = { content: "", reasoning: "", toolCalls: [] };
  let usage = null;
  let chunks = 0;
  let finishReason = null;
  let failed = false;
  const started = performance.now();
  let firstAt = null;
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: requestHeaders(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!response.ok) {
      failed = true;
      view.fail(await errorText(response));
      if (response.status === 401) await askForKey();
    } else {
      for await (const payload of sseEvents(response.body)) {
        if (payload.error) {
          failed = true;
          view.fail(payload.error.message);
          break;
        }
        if (payload.usage) usage = payload.usage;
        for (const choice of payload.choices || []) {
          const delta = choice.delta || {};
          const reasoning = delta.reasoning_content || delta.reasoning;
          if (reasoning || delta.content || delta.tool_calls) {
            if (firstAt === null) firstAt = performance.now();
            chunks += 1;
          }
          if (reasoning) view.thinking(answer.reasoning += reasoning);
          if (delta.content) view.content(answer.content += delta.content);
          for (const call of delta.tool_calls || []) {
            const known = answer.toolCalls[call.index];
            if (known) {
              known.function.arguments += (call.function && call.function.arguments) || "";
            } else {
              answer.toolCalls[call.index] = {
                id: call.id, type: "function",
                function: { name: call.function.name, arguments: call.function.arguments || "" },
              };
            }
            view.toolCalls(answer.toolCalls);
          }
          if (choice.finish_reason) finishReason = choice.finish_reason;
        }
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      finishReason = "stopped";
    } else {
      failed = true;
      view.fail(`The connection failed: ${error.message}`);
    }
  } finally {
    controller = null;
    setBusy(false);
  }
  const ended = performance.now();
  if (answer.reasoning) view.summary.textContent = "Thinking"; else view.details.remove();
  const exact = usage !== null;
  const tokens = exact ? usage.completion_tokens : chunks;
  view.stats(formatStats(tokens, exact, started, firstAt, ended, finishReason || (failed ? "error" : "done")));
  if (failed && !answer.content && !answer.toolCalls.length) {
    if (history.length && history[history.length - 1].role === "user") history.pop(); // send it again later
    return;
  }
  const message = { role: "assistant", content: answer.content };
  if (answer.toolCalls.length) message.tool_calls = answer.toolCalls;
  history.push(message);
  if (answer.toolCalls.length && finishReason !== "stopped") {
    view.askToolResults(answer.toolCalls, (results) => {
      answer.toolCalls.forEach((call, i) => {
        history.push({ role: "tool", tool_call_id: call.id, content: results[i] });
        addBubble("tool", `${call.function.name} → ${results[i]}`).classList.add("tool-result");
      });
      generate();
    });
  }
  $("prompt").focus();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  history.push({ role: "user", content: text });
  addBubble("user", text);
  generate();
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => {
  if (controller) controller.abort(); // closing the stream aborts the request on the server
});

$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("messages").replaceChildren();
  showError("");
});

$("tools-toggle").addEventListener("click", () => {
  $("tools-panel").hidden = !$("tools-panel").hidden;
});

loadModels();
