// preftune annotate, the overview for whoever runs the task: counts only, read-only, built with textContent.
// The admin token comes from the URL's fragment and stays in this tab (sessionStorage), as on the main page.
"use strict";
(function () {
  const TOKEN_KEY = "preftune-annotate-admin-token";
  const TITLES = { pairs: "Preference pairs", eval: "Blind evaluation" };
  const $ = (id) => document.getElementById(id);
  let token = null;

  function takeToken() {
    const given = new URLSearchParams(location.hash.slice(1)).get("token");
    if (given) {
      sessionStorage.setItem(TOKEN_KEY, given);
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function element(tag, text) {
    const made = document.createElement(tag);
    if (text !== undefined) made.textContent = String(text);
    return made;
  }

  function table(headings, rows) {
    const made = element("table");
    const head = element("tr");
    for (const h of headings) head.appendChild(element("th", h));
    made.appendChild(head);
    for (const row of rows) {
      const tr = element("tr");
      for (const cell of row) tr.appendChild(element("td", cell));
      made.appendChild(tr);
    }
    return made;
  }

  function show(data) {
    const container = $("tasks");
    container.replaceChildren();
    for (const [task, t] of Object.entries(data.tasks)) {
      const section = element("section");
      section.className = "box";
      section.id = "overview-" + task;
      section.appendChild(element("h2", TITLES[task] || task));
      section.appendChild(element("p", `${t.complete} of ${t.items} items have ${data.votes_per_item} ` +
        `vote${data.votes_per_item === 1 ? "" : "s"} · ${t.votes} votes`));
      const names = Object.entries(t.annotators);
      section.appendChild(table(["annotator", "votes", "undone", "skipped"],
        names.map(([name, c]) => [name, c.votes, c.retracted, c.skipped])));
      const alpha = t.agreement.krippendorff_alpha;
      section.appendChild(element("p", `agreement on ${t.agreement.items} items with several votes: ` +
        `Krippendorff's α ${alpha === null ? "—" : alpha.toFixed(3)}`));
      section.appendChild(element("p", `${t.split.length} item${t.split.length === 1 ? "" : "s"} with split votes`));
      if (t.split.length) {
        section.appendChild(table(["item", "file, line", "votes per label"],
          t.split.map((s) => [s.id, `${s.source}, line ${s.line}`,
                              Object.entries(s.labels).map(([k, v]) => `${k} ${v}`).join(", ")])));
      }
      container.appendChild(section);
    }
    if (!Object.keys(data.tasks).length) $("status").textContent = "No items loaded.";
  }

  async function refresh() {
    if (!token) return;
    const response = await fetch("/api/overview", { cache: "no-store", credentials: "same-origin",
                                                    headers: { "Authorization": "Bearer " + token } });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      $("status").textContent = (data && data.error) || ("HTTP " + response.status);
      if (response.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        token = null;
        $("login").hidden = false;
      }
      return;
    }
    $("status").textContent = "";
    show(data);
  }

  function init() {
    token = takeToken();
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      token = $("token").value.trim();
      sessionStorage.setItem(TOKEN_KEY, token);
      $("login").hidden = true;
      refresh();
    });
    $("refresh").addEventListener("click", refresh);
    setInterval(refresh, 15000);
    if (token) refresh(); else $("login").hidden = false;
  }

  init();
})();
