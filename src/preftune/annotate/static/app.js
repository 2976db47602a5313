// preftune annotate: the page's whole logic. Every text from the server is shown with textContent, never parsed
// as HTML; the access token comes from the URL's fragment and stays in this tab (sessionStorage).
"use strict";
(function () {
  const TOKEN_KEY = "preftune-annotate-token";
  const NAME_KEY = "preftune-annotate-name";
  const KEYS = { "1": "left", "a": "left", "2": "right", "b": "right", "3": "tie", "t": "tie",
                 "4": "both_bad", "x": "both_bad" };
  const QUESTIONS = {
    pairs: "Which response is better? (A and B are in random order.)",
    eval: "Blind evaluation: which response is better? (A and B are in random order; their sources are hidden.)",
  };
  const $ = (id) => document.getElementById(id);
  const state = { token: null, task: null, annotator: "", item: null, busy: false, tasks: {}, shown: 0,
                  canUndo: false, session: newSession() };
  // The guidelines arrive as plain data (preftune.annotate.guidelines); only these elements are ever made.
  const BLOCKS = { h1: "h3", h2: "h4", h3: "h5", p: "p", ul: "ul", ol: "ol", pre: "pre" };
  const STYLES = { strong: "strong", em: "em", code: "code" };

  // This page's session: 128 random bits, in memory only, so an undo reaches only votes cast from this page.
  function newSession() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function takeToken() {
    const fragment = new URLSearchParams(location.hash.slice(1));
    const given = fragment.get("token");
    if (given) {
      sessionStorage.setItem(TOKEN_KEY, given);
      history.replaceState(null, "", location.pathname + location.search);  // out of the address bar
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function say(message, ok) {
    $("status").textContent = message || "";
    $("status").className = ok ? "ok" : "";
  }

  async function api(path, body) {
    const init = { method: body === undefined ? "GET" : "POST", cache: "no-store", credentials: "same-origin",
                   headers: { "Authorization": "Bearer " + state.token } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      state.token = null;
      showLogin();
    }
    if (!response.ok) throw new Error((data && data.error) || ("HTTP " + response.status));
    return data;
  }

  // A prompt or a response: a string, or a list of {role, content} messages.
  function render(container, value) {
    container.replaceChildren();
    const messages = typeof value === "string" ? [{ role: null, content: value }] : value;
    for (const message of messages) {
      const box = document.createElement("div");
      box.className = "message";
      if (message.role !== null) {
        const role = document.createElement("span");
        role.className = "role";
        role.textContent = message.role;
        box.appendChild(role);
      }
      const content = document.createElement("span");
      content.className = "content" + (message.content === "" ? " empty" : "");
      content.textContent = message.content;
      box.appendChild(content);
      container.appendChild(box);
    }
  }

  function renderSpans(parent, spans) {
    for (const span of spans) {
      const element = document.createElement(STYLES[span.style] || "span");
      element.textContent = span.text;
      parent.appendChild(element);
    }
  }

  function renderGuidelines(blocks) {
    const container = $("guidelines");
    container.replaceChildren();
    for (const block of blocks) {
      const tag = BLOCKS[block.kind];
      if (!tag) continue;
      const element = document.createElement(tag);
      if (block.kind === "pre") {
        element.textContent = block.text;
      } else if (block.kind === "ul" || block.kind === "ol") {
        for (const entry of block.items) {
          const li = document.createElement("li");
          renderSpans(li, entry);
          element.appendChild(li);
        }
      } else {
        renderSpans(element, block.spans);
      }
      container.appendChild(element);
    }
    $("guidelines-box").hidden = blocks.length === 0;
  }

  function showItem(item) {
    state.item = item;
    $("done").hidden = true;
    $("work").hidden = false;
    $("question").textContent = QUESTIONS[state.task];
    render($("prompt"), item.prompt);
    render($("left"), item.left);
    render($("right"), item.right);
    $("note").value = "";
  }

  function showProgress(p) {
    const total = p.done + p.left;
    $("progress-row").hidden = false;
    $("progress").max = Math.max(total, 1);
    $("progress").value = p.done;
    $("progress-text").textContent = `${p.done} of ${total} done by you · ${p.complete} of ${p.items} items have ` +
      `${p.votes_per_item} vote${p.votes_per_item === 1 ? "" : "s"} · ${p.votes} votes by ${p.annotators} ` +
      `annotator${p.annotators === 1 ? "" : "s"}`;
  }

  function setBusy(busy) {
    state.busy = busy;
    for (const button of document.querySelectorAll("#choices button")) button.disabled = busy;
    for (const id of ["undo", "undo-done"]) $(id).disabled = busy || !state.canUndo;
  }

  async function loadNext() {
    if (!state.token || !state.task) return;
    if (!state.annotator) {
      state.shown++;  // a request still on its way is for a name no longer there
      $("work").hidden = true;
      $("done").hidden = true;
      say("Enter your name (top right) to start.", true);
      $("annotator").focus();
      return;
    }
    setBusy(true);
    const request = ++state.shown;  // only the latest request may draw (a name or task changed meanwhile)
    try {
      const data = await api("/api/next", { task: state.task, annotator: state.annotator });
      if (request !== state.shown) return;
      showProgress(data.progress);
      state.item = data.item;
      if (data.item === null) {
        $("work").hidden = true;
        $("done").hidden = false;
        $("done-text").textContent = `All done, ${state.annotator}: you labelled ${data.progress.done} ` +
          `item${data.progress.done === 1 ? "" : "s"} here. Thank you!`;
        return;
      }
      showItem(data.item);
    } catch (e) {
      if (request === state.shown) say(e.message);
    } finally {
      if (request === state.shown) setBusy(false);
    }
  }

  async function vote(choice) {
    if (state.busy || !state.item) return;
    setBusy(true);
    try {
      const data = await api("/api/vote", { task: state.task, annotator: state.annotator, item: state.item.id,
                                            choice: choice, note: $("note").value, session: state.session });
      state.canUndo = true;
      say(data.recorded ? "Saved. (U undoes it.)" : "Already saved.", true);
    } catch (e) {
      say(e.message);
      setBusy(false);
      return;
    }
    await loadNext();
  }

  const CLICKED = { left: "A is better", right: "B is better", tie: "Tie", both_bad: "Both bad" };

  async function undo() {
    if (state.busy || !state.canUndo) return;
    setBusy(true);
    const request = ++state.shown;  // an item still on its way must not replace the one undone
    try {
      const data = await api("/api/undo", { task: state.task, annotator: state.annotator, session: state.session });
      state.canUndo = false;
      showProgress(data.progress);
      showItem(data.item);
      $("note").value = data.note;
      say(`Your last vote (${CLICKED[data.choice] || data.choice}) is withdrawn: vote again.`, true);
    } catch (e) {
      state.canUndo = false;
      say(e.message);
    } finally {
      if (request === state.shown) setBusy(false);
    }
  }

  async function skip() {
    if (state.busy || !state.item) return;
    setBusy(true);
    try {
      await api("/api/skip", { task: state.task, annotator: state.annotator, item: state.item.id,
                               session: state.session });
      say("Skipped: it goes to others first and comes back to you at the end.", true);
    } catch (e) {
      say(e.message);
      setBusy(false);
      return;
    }
    await loadNext();
  }

  function chooseTask(task) {
    state.task = task;
    state.canUndo = false;  // an undo reaches the last vote of this task and name only
    const url = new URL(location.href);
    url.searchParams.set("task", task);
    history.replaceState(null, "", url.pathname + url.search);
    for (const button of document.querySelectorAll("#tasks button")) {
      button.setAttribute("aria-pressed", String(button.dataset.task === task));
    }
    loadNext();
  }

  async function start() {
    $("login").hidden = true;
    try {
      const status = await api("/api/status");
      state.tasks = status.tasks;
      renderGuidelines(status.guidelines || []);
    } catch (e) {
      say(e.message);
      return;
    }
    const available = Object.keys(state.tasks).filter((t) => state.tasks[t] > 0);
    for (const button of document.querySelectorAll("#tasks button")) {
      button.hidden = !available.includes(button.dataset.task);
    }
    if (available.length === 0) {
      say("No items loaded: start the server with --pairs FILE or --samples FILE.");
      return;
    }
    const asked = new URLSearchParams(location.search).get("task");
    chooseTask(available.includes(asked) ? asked : available[0]);
  }

  function showLogin() {
    $("login").hidden = false;
    $("work").hidden = true;
    $("token").focus();
  }

  function onKey(event) {
    const typing = event.target instanceof HTMLInputElement || event.target instanceof HTMLTextAreaElement;
    if (typing) {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key.toLowerCase();
    if (key === "u" && !$("done").hidden) {  // the last item voted: undo still reaches it
      event.preventDefault();
      undo();
      return;
    }
    if ($("work").hidden) return;
    if (key === "n") {
      event.preventDefault();
      $("note").focus();
    } else if (key === "s") {
      event.preventDefault();
      skip();
    } else if (key === "u") {
      event.preventDefault();
      undo();
    } else if (KEYS[key]) {
      event.preventDefault();
      vote(KEYS[key]);
    }
  }

  function init() {
    state.token = takeToken();
    state.annotator = (localStorage.getItem(NAME_KEY) || "").trim();
    $("annotator").value = state.annotator;
    $("annotator").addEventListener("change", () => {
      state.annotator = $("annotator").value.trim().slice(0, 64);
      state.canUndo = false;
      localStorage.setItem(NAME_KEY, state.annotator);
      $("annotator").blur();
      say("");
      loadNext();
    });
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      state.token = $("token").value.trim();
      sessionStorage.setItem(TOKEN_KEY, state.token);
      start();
    });
    for (const button of document.querySelectorAll("#choices button[data-choice]")) {
      button.addEventListener("click", () => vote(button.dataset.choice));
    }
    $("skip").addEventListener("click", skip);
    $("undo").addEventListener("click", undo);
    $("undo-done").addEventListener("click", undo);
    for (const button of document.querySelectorAll("#tasks button")) {
      button.addEventListener("click", () => chooseTask(button.dataset.task));
    }
    document.addEventListener("keydown", onKey);
    if (state.token) start(); else showLogin();
  }

  init();
})();
