// trustmap reader study: the admin page. The admin key stays in this tab's sessionStorage
// and travels in an X-Admin-Key header, never in a URL.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  let key = sessionStorage.getItem("trustmap-admin-key") || "";

  function status(text, kind) {
    $("admin-status").textContent = text;
    $("admin-status").className = "status" + (kind ? " " + kind : "");
  }
  async function call(path) {
    const r = await fetch(path, { headers: { "X-Admin-Key": key }, cache: "no-store" });
    if (r.status === 401 || r.status === 403) {
      sessionStorage.removeItem("trustmap-admin-key");
      $("admin-body").hidden = true;
      throw new Error(r.status === 401 ? "The admin key is missing." : "Wrong admin key.");
    }
    if (!r.ok) throw new Error("HTTP " + r.status);
    return r;
  }
  function cell(tr, text) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }
  async function refresh() {
    try {
      const p = await (await call("/api/admin/progress")).json();
      sessionStorage.setItem("trustmap-admin-key", key);
      $("admin-body").hidden = false;
      $("study-title").textContent = p.title + " (" + p.design + " design)";
      const body = $("progress-table").querySelector("tbody");
      body.textContent = "";
      let done = 0;
      let total = 0;
      for (const r of p.readers) {
        done += r.answered;
        total += r.total;
        const tr = document.createElement("tr");
        cell(tr, String(r.reader + 1));
        cell(tr, r.variant || "-");
        cell(tr, r.answered + " / " + r.total + (r.finished ? " \u2713" : ""));
        const td = cell(tr, "");
        const meter = document.createElement("meter");
        meter.min = 0;
        meter.max = r.total;
        meter.value = r.answered;
        td.appendChild(meter);
        cell(tr, r.last_answer_at ? new Date(r.last_answer_at * 1000).toLocaleString() : "-");
        body.appendChild(tr);
      }
      status(done + " of " + total + " answers in all.", "ok");
    } catch (err) {
      status(err.message, "error");
    }
  }
  async function download(path, name) {
    try {
      const blob = await (await call(path)).blob();
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = name;
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
    } catch (err) {
      status(err.message, "error");
    }
  }
  async function links() {
    try {
      const rows = await (await call("/api/admin/readers")).json();
      const body = $("links-table").querySelector("tbody");
      body.textContent = "";
      for (const r of rows) {
        const tr = document.createElement("tr");
        cell(tr, String(r.reader + 1));
        cell(tr, r.variant || "-");
        const code = document.createElement("code");
        code.textContent = r.url;
        cell(tr, "").appendChild(code);
        body.appendChild(tr);
      }
      $("links-table").hidden = false;
    } catch (err) {
      status(err.message, "error");
    }
  }
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    key = $("key").value.trim();
    $("key").value = "";
    refresh();
  });
  $("refresh").addEventListener("click", refresh);
  $("csv").addEventListener("click", () => download("/api/admin/export.csv", "answers.csv"));
  $("json").addEventListener("click", () => download("/api/admin/export.json", "answers.json"));
  $("links").addEventListener("click", links);
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem("trustmap-admin-key");
    key = "";
    $("admin-body").hidden = true;
    status("Key forgotten.", "");
  });
  if (key) refresh();
})();
