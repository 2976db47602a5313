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
  const state = { token: null, task: null, annotator: "", item: null, busy: false, tasks: {}, shown: 0 };

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
      $("done").hidden = true;
      $("work").hidden = false;
      $("question").textContent = QUESTIONS[state.task];
      render($("prompt"), data.item.prompt);
      render($("left"), data.item.left);
      render($("right"), data.item.right);
      $("note").value = "";
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
                                            choice: choice, note: $("note").value });
      say(data.recorded ? "Saved." : "Already saved.", true);
    } catch (e) {
      say(e.message);
      setBusy(false);
      return;
    }
    await loadNext();
  }

  function chooseTask(task) {
    state.task = task;
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
    if (event.ctrlKey || event.metaKey || event.altKey || $("work").hidden) return;
    const key = event.key.toLowerCase();
    if (key === "n") {
      event.preventDefault();
      $("note").focus();
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
    for (const button of document.querySelectorAll("#choices button")) {
      button.addEventListener("click", () => vote(button.dataset.choice));
    }
    for (const button of document.querySelectorAll("#tasks button")) {
      button.addEventListener("click", () => chooseTask(button.dataset.task));
    }
    document.addEventListener("keydown", onKey);
    if (state.token) start(); else showLogin();
  }

  init();
})();
