// Chat page logic: keeps the conversation, sends the last N turns to /v1/chat/completions with stream=true and
// renders the SSE deltas as they arrive (content, reasoning_content as a collapsible block, tool_calls).
// Model output is only ever inserted as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const past = [];             // finished turns: {role: "user"|"assistant", content, tool_calls?}
let controller = null;       // AbortController of the reply being streamed (stop button / disconnect)

const sliders = [["temperature", "temperature-value"], ["top_p", "top_p-value"], ["history", "history-value"]];
for (const [id, out] of sliders) {
  const show = () => { $(out).textContent = $(id).value; };
  $(id).addEventListener("input", show);
  show();
}

// Which checkpoint is served, and its limits
fetch("/v1/models").then((r) => r.json()).then((data) => {
  const m = data.data[0];
  $("model-name").textContent = m.id;
  $("model-info").textContent = `context ${m.context_length} tokens · max_tokens ≤ ${m.max_tokens_limit}`;
  $("max_tokens").max = m.max_tokens_limit;
  if (m.defaults) {
    $("temperature").value = m.defaults.temperature; $("top_p").value = m.defaults.top_p;
    $("temperature").dispatchEvent(new Event("input")); $("top_p").dispatchEvent(new Event("input"));
  }
}).catch((e) => { $("model-name").textContent = "(server unreachable: " + e + ")"; });

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function addMessage(role, text) {
  const box = el("div", "msg " + role);
  box.appendChild(el("div", "role", role === "user" ? "你 / you" : "MiniMind"));
  const content = el("div", "content", text || "");
  box.appendChild(content);
  $("messages").appendChild(box);
  $("messages").scrollTop = $("messages").scrollHeight;
  return { box, content };
}

function requestBody(userText) {
  const turns = parseInt($("history").value, 10);
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  // N turns = the last N user+assistant pairs; 0 sends only the new message
  if (turns > 0) messages.push(...past.slice(-2 * turns));
  messages.push({ role: "user", content: userText });
  const body = {
    model: $("model-name").textContent, messages, stream: true, stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top_p").value),
    max_tokens: parseInt($("max_tokens").value, 10),
  };
  if ($("thinking").value) body.enable_thinking = $("thinking").value === "on";
  const tools = $("tools").value.trim();
  if (tools) body.tools = JSON.parse(tools);   // a JSON error is shown in the reply bubble
  return body;
}

// Split an SSE byte stream into the JSON payloads of its "data:" lines
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(userText) {
  const { box: ubox } = addMessage("user", userText);
  const { box, content } = addMessage("assistant", "");
  box.classList.add("streaming");
  let think = null, reasoning = "", text = "", finish = null, usage = null;
  const calls = [];
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody(userText)), signal: controller.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || response.statusText);
    }
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const d = choice.delta || {};
      if (d.reasoning_content) {
        if (!think) {
          think = el("details", "think");
          think.open = true;  // open while thinking; folded once the answer starts
          think.appendChild(el("summary", "", "思考 / thinking"));
          think.appendChild(el("div", "think-text"));
          box.insertBefore(think, content);
        }
        reasoning += d.reasoning_content;
        think.lastChild.textContent = reasoning;
      }
      if (d.content) {
        if (think && !text) think.open = false;
        text += d.content;
        content.textContent = text;
      }
      for (const tc of d.tool_calls || []) {
        calls.push(tc);
        const div = el("div", "tool-call", `tool call: ${tc.function.name}(${tc.function.arguments})`);
        box.insertBefore(div, content.nextSibling);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      $("messages").scrollTop = $("messages").scrollHeight;
    }
    const turn = { role: "assistant", content: text };
    if (calls.length) turn.tool_calls = calls.map(({ id, type, function: f }) => ({ id, type, function: f }));
    past.push({ role: "user", content: userText }, turn);
    const meta = [finish && `finish: ${finish}`,
      usage && `tokens: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} reply`].filter(Boolean);
    box.appendChild(el("div", "meta", meta.join(" · ")));
  } catch (e) {
    const stopped = e.name === "AbortError";
    box.appendChild(el("div", "meta" + (stopped ? "" : " error"), stopped ? "(stopped)" : "error: " + e.message));
    if (stopped && text) past.push({ role: "user", content: userText }, { role: "assistant", content: text });
    if (!stopped && !text) ubox.classList.add("failed");
  } finally {
    box.classList.remove("streaming");
    box.classList.add("done");
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("send").click(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => { past.length = 0; $("messages").textContent = ""; });
