// trustmap reader study: the reader's page. No framework, no external resource.
// Every answer is sent at once (PUT, retried until the server confirms it); reopening the
// link resumes at the first question with an unanswered field.
"use strict";

(function () {
  const token = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
  const api = "/api/r/" + encodeURIComponent(token);
  const $ = (id) => document.getElementById(id);

  let study = null;           // the state sent by the server
  let answers = {};           // item id -> value (confirmed or pending)
  let pos = 0;                // index of the question shown
  let active = 0;             // index of the active field in that question
  let negative = false;       // a "-" was typed and waits for its digit
  let finished = false;       // the thank-you page is shown
  const pending = new Map();  // item id -> value not yet confirmed
  const sending = new Set();
  const shownMs = {};         // question id -> visible milliseconds so far
  let shownSince = null;

  function totalItems() {
    return study.questions.reduce((n, q) => n + q.items.length, 0);
  }
  function answeredCount() {
    let n = 0;
    for (const q of study.questions) for (const it of q.items) if (it.id in answers) n++;
    return n;
  }
  function complete(q) {
    return q.items.every((it) => it.id in answers);
  }
  function firstOpen() {
    const i = study.questions.findIndex((q) => !complete(q));
    return i;
  }

  // -- reading time: the time the question was visible, summed over visits -----------
  function clockStop() {
    if (shownSince !== null && study) {
      const q = study.questions[pos];
      shownMs[q.id] = (shownMs[q.id] || 0) + (performance.now() - shownSince);
    }
    shownSince = null;
  }
  function clockStart() {
    shownSince = document.visibilityState === "visible" && !finished ? performance.now() : null;
  }
  function elapsed(q) {
    const running = shownSince !== null ? performance.now() - shownSince : 0;
    return Math.round((shownMs[q.id] || 0) + running);
  }
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") clockStart();
    else clockStop();
  });

  // -- fields ----------------------------------------------------------------------------
  function fieldSpec(item) {
    if (item.field === "rating") return { low: study.scale.low, high: study.scale.high };
    if (item.field === "confidence") return { low: study.confidence.low, high: study.confidence.high };
    return { low: 0, high: study.classes.length - 1, classes: study.classes };
  }
  function optionLabel(item, v) {
    if (item.field === "diagnosis") return (v + 1) + " " + study.classes[v];
    return v > 0 && item.field === "rating" && study.scale.low < 0 ? "+" + v : String(v);
  }
  function keyValue(item, key) {
    // The key typed for value v: the number itself (after "-" for negatives); a diagnosis
    // is chosen by its position 1, 2, ...
    if (!/^[0-9]$/.test(key)) return null;
    const d = Number(key);
    if (item.field === "diagnosis") {
      if (negative) return null;
      return d >= 1 && d <= study.classes.length ? d - 1 : null;
    }
    const v = negative ? -d : d;
    const s = fieldSpec(item);
    return v >= s.low && v <= s.high ? v : null;
  }

  // -- saving ------------------------------------------------------------------------------
  function setStatus(text, kind) {
    const el = $("status");
    el.textContent = text;
    el.className = "status" + (kind ? " " + kind : "");
  }
  async function send(itemId, attempt) {
    if (sending.has(itemId)) return;
    const value = pending.get(itemId);
    const q = study.questions.find((x) => x.items.some((it) => it.id === itemId));
    sending.add(itemId);
    try {
      const r = await fetch(api + "/answer/" + encodeURIComponent(itemId), {
        method: "PUT",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ value: value, time_ms: q ? elapsed(q) : null }),
        cache: "no-store",
      });
      if (!r.ok) {
        const detail = await r.json().catch(() => ({}));
        throw new Error(r.status + " " + (detail.detail || r.statusText));
      }
      await r.json(); // read the confirmation through, so the request completes cleanly
      sending.delete(itemId);
      if (pending.get(itemId) === value) pending.delete(itemId);
      else return send(itemId, 0); // changed while in flight: send the newer value
      if (pending.size === 0) setStatus("All answers saved.", "ok");
      render(false);
    } catch (err) {
      sending.delete(itemId);
      const wait = Math.min(8000, 500 * 2 ** attempt);
      setStatus("Not saved yet (" + err.message + "); retrying in " + wait / 1000 + " s...", "error");
      setTimeout(() => send(itemId, attempt + 1), wait);
    }
  }
  function answer(item, value) {
    answers[item.id] = value;
    pending.set(item.id, value);
    setStatus("Saving...", "");
    send(item.id, 0);
    const q = study.questions[pos];
    const next = q.items.findIndex((it, k) => k > active && !(it.id in answers));
    const anyOpen = q.items.findIndex((it) => !(it.id in answers));
    if (next >= 0) active = next;
    else if (anyOpen >= 0) active = anyOpen;
    render(true);
  }

  // -- navigation ---------------------------------------------------------------------------
  function go(index) {
    clockStop();
    finished = false;
    pos = Math.max(0, Math.min(study.questions.length - 1, index));
    const q = study.questions[pos];
    const open = q.items.findIndex((it) => !(it.id in answers));
    active = open >= 0 ? open : 0;
    negative = false;
    clockStart();
    render(true);
  }
  function next() {
    const q = study.questions[pos];
    if (!complete(q)) {
      setStatus("Please answer every field of this question first.", "error");
      return;
    }
    if (pos + 1 < study.questions.length) go(pos + 1);
    else finish();
  }
  function back() {
    if (finished) go(study.questions.length - 1);
    else if (pos > 0) go(pos - 1);
  }
  function finish() {
    const open = firstOpen();
    if (open >= 0) {
      go(open);
      setStatus("Some questions are still open.", "error");
      return;
    }
    clockStop();
    finished = true;
    render(true);
  }

  // -- drawing ------------------------------------------------------------------------------
  function progress() {
    const total = totalItems();
    const done = answeredCount();
    const pct = total ? Math.round((100 * done) / total) : 0;
    $("progress-fill").style.width = pct + "%";
    $("progress-bar").setAttribute("aria-valuenow", String(pct));
    $("progress-text").textContent = done + " of " + total + " answers (" + pct + "%)";
  }
  function button(text, cls, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.className = cls;
    b.addEventListener("click", onClick);
    return b;
  }
  function scaleRow(item, index) {
    const s = fieldSpec(item);
    const row = document.createElement("div");
    row.className = "scale scale-" + item.field;
    row.setAttribute("role", "radiogroup");
    for (let v = s.low; v <= s.high; v++) {
      const b = button(optionLabel(item, v), "opt", () => {
        active = index;
        answer(item, v);
      });
      b.dataset.value = String(v);
      b.setAttribute("role", "radio");
      b.setAttribute("aria-checked", String(answers[item.id] === v));
      if (answers[item.id] === v) b.classList.add("chosen");
      row.appendChild(b);
    }
    return row;
  }
  function render(rebuild) {
    progress();
    const nq = study.questions.length;
    $("question").hidden = finished;
    $("done").hidden = !finished;
    $("next").disabled = finished;
    $("back").disabled = !finished && pos === 0;
    if (finished) {
      $("position").textContent = "finished";
      $("done-text").textContent = answeredCount() + " answers in " + nq + " questions.";
      return;
    }
    const q = study.questions[pos];
    $("position").textContent = "Question " + (pos + 1) + " of " + nq;
    $("next").textContent = pos + 1 === nq ? "Finish \u2713" : "Next \u2192";
    if (study.design === "rating") {
      const c = study.criteria[q.criterion];
      $("prompt-title").textContent = c.label;
      $("prompt-text").textContent = c.prompt + "  Rate every panel from " + study.scale.low +
        " (" + study.scale.low_label + ") to " + study.scale.high + " (" + study.scale.high_label + ").";
    } else {
      $("prompt-title").textContent = "Your reading";
      $("prompt-text").textContent = "Give your diagnosis and how confident you are.";
    }
    const pred = $("prediction");
    pred.hidden = !q.prediction;
    if (q.prediction) {
      pred.textContent = "Model prediction: " + q.prediction.label + " (probability " +
        q.prediction.probability.toFixed(2) + ")";
    }
    const panels = $("panels");
    if (rebuild || panels.dataset.q !== q.id) {
      panels.textContent = "";
      panels.dataset.q = q.id;
      panels.className = "panels panels-" + study.design;
      const ref = document.createElement("figure");
      ref.className = "ref";
      const img = document.createElement("img");
      img.src = q.image;
      img.alt = study.design === "rating" ? "the image without overlay" : "the image";
      ref.appendChild(img);
      const cap = document.createElement("figcaption");
      cap.textContent = study.design === "rating" ? "Image" : "";
      ref.appendChild(cap);
      panels.appendChild(ref);
      q.items.forEach((item, k) => {
        const fig = document.createElement("figure");
        fig.className = "panel";
        fig.dataset.item = item.id;
        fig.dataset.index = String(k);
        fig.addEventListener("click", () => {
          active = k;
          render(false);
        });
        if (item.image) {
          const pimg = document.createElement("img");
          pimg.src = item.image;
          pimg.alt = "panel " + (k + 1);
          fig.appendChild(pimg);
        }
        const cap2 = document.createElement("figcaption");
        cap2.textContent = item.field === "rating" ? "Panel " + (k + 1)
          : item.field === "diagnosis" ? "Diagnosis" : "Confidence (" + study.confidence.low +
            " " + study.confidence.low_label + " \u2026 " + study.confidence.high + " " +
            study.confidence.high_label + ")";
        fig.appendChild(cap2);
        fig.appendChild(scaleRow(item, k));
        panels.appendChild(fig);
      });
    }
    panels.querySelectorAll("figure.panel").forEach((fig) => {
      const k = Number(fig.dataset.index);
      const item = q.items[k];
      fig.classList.toggle("active", k === active);
      fig.classList.toggle("answered", item.id in answers);
      fig.classList.toggle("saving", pending.has(item.id));
      fig.querySelectorAll("button.opt").forEach((b) => {
        const on = answers[item.id] === Number(b.dataset.value);
        b.classList.toggle("chosen", on);
        b.setAttribute("aria-checked", String(on));
      });
    });
  }
  function help() {
    const rows = study.design === "rating"
      ? [
          ["0 \u2026 " + study.scale.high, "rate the active panel"],
          ["- then 1 \u2026 " + -study.scale.low, "negative ratings"],
          ["\u2191 \u2193", "previous / next panel"],
        ]
      : [
          ["1 \u2026 " + study.classes.length, "diagnosis (when active)"],
          [study.confidence.low + " \u2026 " + study.confidence.high, "confidence (when active)"],
          ["\u2191 \u2193", "switch between diagnosis and confidence"],
        ];
    rows.push(["Enter, \u2192", "next question"], ["\u2190, Backspace", "previous question"]);
    const ul = $("help-list");
    ul.textContent = "";
    for (const [k, t] of rows) {
      const li = document.createElement("li");
      const kb = document.createElement("kbd");
      kb.textContent = k;
      li.appendChild(kb);
      li.appendChild(document.createTextNode(" " + t));
      ul.appendChild(li);
    }
  }

  // -- keyboard -------------------------------------------------------------------------------
  document.addEventListener("keydown", (e) => {
    if (!study || e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key;
    if (k === "Enter" || k === "ArrowRight" || k === "PageDown") {
      e.preventDefault();
      if (!finished) next();
      return;
    }
    if (k === "ArrowLeft" || k === "Backspace" || k === "PageUp") {
      e.preventDefault();
      back();
      return;
    }
    if (finished) return;
    const q = study.questions[pos];
    if (k === "ArrowDown" || k === "ArrowUp") {
      e.preventDefault();
      const n = q.items.length;
      active = (active + (k === "ArrowDown" ? 1 : n - 1)) % n;
      negative = false;
      render(false);
      return;
    }
    if (k === "-" || k === "Subtract") {
      e.preventDefault();
      negative = true;
      setStatus("\u2212 typed: now the number", "");
      return;
    }
    const item = q.items[active];
    const v = keyValue(item, k);
    negative = false;
    if (v !== null) {
      e.preventDefault();
      answer(item, v);
    }
  });
  $("next").addEventListener("click", next);
  $("back").addEventListener("click", back);
  window.addEventListener("beforeunload", (e) => {
    if (pending.size) {
      e.preventDefault();
      e.returnValue = "";
    }
  });

  // -- start ----------------------------------------------------------------------------------
  fetch(api + "/state", { cache: "no-store" })
    .then((r) => {
      if (!r.ok) throw new Error(r.status === 404 ? "This link is not valid." : "HTTP " + r.status);
      return r.json();
    })
    .then((s) => {
      study = s;
      answers = Object.assign({}, s.answers);
      if (s.title) {
        $("title").textContent = s.title;
        document.title = s.title;
      }
      help();
      const open = firstOpen();
      if (open < 0) {
        pos = study.questions.length - 1;
        finished = true;
        render(true);
      } else {
        go(open);
        if (open > 0) setStatus("Welcome back: you continue at question " + (open + 1) + ".", "ok");
      }
    })
    .catch((err) => setStatus(err.message, "error"));
})();
