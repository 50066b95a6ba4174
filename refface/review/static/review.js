/* refface identity review page: plain script, data from data.js (window.REFFACE_REVIEW). */
(function () {
  "use strict";
  const D = window.REFFACE_REVIEW;
  const $ = (id) => document.getElementById(id);
  if (!D) {
    document.body.insertAdjacentHTML("afterbegin", "<p>data.js is missing: run refface review ROOT again.</p>");
    return;
  }
  const STORE = "refface-review:" + D.root;
  const MAX_FACES = 48;
  const indexOf = new Map(D.paths.map((p, i) => [p, i]));
  const clusters = new Map(D.clusters.map((c) => [c.id, c]));

  // Decisions: faces[path] = {action, value}; merges[identity] = target identity (string);
  // extra = rows of a loaded file that match nothing here (kept so an export loses nothing).
  let state = { faces: {}, merges: {}, extra: [] };
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "null");
    if (saved && saved.faces && saved.merges) state = Object.assign(state, saved);
  } catch (e) { /* storage unavailable or corrupt: start empty */ }

  const ui = { view: [], page: 0, pageSize: 25, row: 0, face: 0, expanded: new Set(), pending: null };

  function save() {
    try { localStorage.setItem(STORE, JSON.stringify(state)); } catch (e) { /* file:// without storage */ }
    updateCount();
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  function message(text) { $("message").textContent = text || ""; }

  // ------------------------------------------------------------------ filters and paging
  function applyFilters(keepId) {
    const flaggedOnly = $("f-flagged").checked;
    const nearOnly = $("f-near").checked;
    const lo = parseInt($("f-min").value, 10);
    const hi = parseInt($("f-max").value, 10);
    const split = $("f-split").value;
    const sort = $("f-sort").value;
    let view = D.clusters.filter((c) =>
      (!flaggedOnly || c.flagged > 0) &&
      (!nearOnly || c.near.length > 0 || c.singletons.length > 0 || (c.labels || []).length > 1) &&
      (isNaN(lo) || c.faces.length >= lo) &&
      (isNaN(hi) || c.faces.length <= hi) &&
      (!split || c.split === split));
    const nearest = (c) => (c.near.length ? c.near[0][1] : Infinity);
    if (sort === "flagged") view.sort((a, b) => b.flagged - a.flagged || a.id - b.id);
    else if (sort === "near") view.sort((a, b) => nearest(a) - nearest(b) || a.id - b.id);
    else if (sort === "size") view.sort((a, b) => b.faces.length - a.faces.length || a.id - b.id);
    ui.view = view;
    ui.pageSize = parseInt($("f-page").value, 10);
    let row = 0;
    if (keepId !== undefined) {
      const at = view.findIndex((c) => c.id === keepId);
      if (at >= 0) row = at;
    }
    ui.row = row;
    ui.face = 0;
    ui.page = Math.floor(row / ui.pageSize);
    render();
  }
  function pages() { return Math.max(1, Math.ceil(ui.view.length / ui.pageSize)); }
  function gotoPage(p) {
    ui.page = Math.min(Math.max(0, p), pages() - 1);
    ui.row = ui.page * ui.pageSize;
    ui.face = 0;
    render();
  }

  // ------------------------------------------------------------------ rendering
  function faceList(c) {
    // Navigable faces of a row: the cluster's own (by distance), then singletons near it.
    return c.faces.concat(c.singletons.map((s) => s[0]));
  }
  function thumb(i) { return '<img loading="lazy" decoding="async" alt="" src="' + esc(D.thumbs[i]) + '">'; }
  function decisionLabel(d) {
    if (!d) return "";
    if (d.action === "move") return "move &rarr; " + esc(d.value);
    return esc(d.action);
  }
  function faceHTML(i, c, pos, lone) {
    const d = state.faces[D.paths[i]];
    const cls = ["face"];
    if (D.flagged[i] && !lone) cls.push("flagged");
    if (c.medoid === i) cls.push("medoid");
    if (d) cls.push(d.action);
    const refs = D.refs[String(i)];
    const label = D.face_labels && D.face_labels[i] ? " [" + D.face_labels[i] + "]" : "";
    const title = D.paths[i] + label + (lone ? " (singleton near this identity)" : "") + " - distance " + D.dist[i];
    return '<div class="' + cls.join(" ") + '" data-face="' + i + '" data-pos="' + pos + '" title="' + esc(title) + '">' +
      thumb(i) + '<div class="d">' + D.dist[i].toFixed(3) + (D.flagged[i] && !lone ? " !" : "") + "</div>" +
      (d ? '<div class="act">' + decisionLabel(d) + "</div>" : "") +
      (refs ? '<div class="refs" data-refs="' + i + '">refs ' + refs[0] + "</div>" : "") + "</div>";
  }
  function pairHTML(c, other, dist) {
    const o = clusters.get(other);
    if (!o) return "";
    const left = c.faces.slice(0, 4).map(thumb).join("");
    const right = o.faces.slice(0, 4).map(thumb).join("");
    return '<div class="pair" data-pair="' + other + '">' + left +
      '<div class="mid">possible same person<br><b>' + c.id + " &harr; " + other + "</b> avg " + dist.toFixed(3) +
      '<br><button data-merge-into="' + other + '">merge into ' + other + "</button></div>" + right +
      ' <span class="badge">' + o.faces.length + " faces</span></div>";
  }
  function labelHTML(c, k) {
    const head = c.labels[0], group = c.labels[k];
    return '<div class="pair labels" data-label-group="' + k + '">' + head[1].slice(0, 4).map(thumb).join("") +
      '<div class="mid">possible same person<br><b>' + esc(head[0]) + " &harr; " + esc(group[0]) + "</b><br>avg " +
      group[2].toFixed(3) + ", both in identity " + c.id +
      '<br><button data-split-label="' + k + '">split off ' + esc(group[0]) + "</button></div>" +
      group[1].slice(0, 4).map(thumb).join("") + ' <span class="badge">' + group[1].length + " faces</span></div>";
  }
  function splitLabel(c, k) {
    const group = c.labels[k];
    group[1].forEach((i) => { state.faces[D.paths[i]] = { action: "move", value: "new:" + group[0] }; });
    save();
    rerenderRow();
  }
  function rowHTML(c, r) {
    const merged = state.merges[String(c.id)];
    const all = c.faces;
    const shown = ui.expanded.has(c.id) ? all : all.slice(0, MAX_FACES);
    const faces = shown.map((i, pos) => faceHTML(i, c, pos, false)).join("");
    const more = all.length > shown.length ? '<button class="more" data-expand="' + c.id + '">show all ' + all.length + "</button>" : "";
    const singles = c.singletons.length
      ? '<div class="sub singles">singletons near this identity:<div class="faces">' +
        c.singletons.map((s, k) => faceHTML(s[0], c, all.length + k, true)).join("") + "</div></div>"
      : "";
    const labelPairs = (c.labels || []).slice(1).map((g, k) => labelHTML(c, k + 1)).join("");
    const pairs = c.near.length || labelPairs
      ? '<div class="sub">' + labelPairs + c.near.map((p) => pairHTML(c, p[0], p[1])).join("") + "</div>" : "";
    return '<section class="row' + (r === ui.row ? " current" : "") + (merged ? " merged" : "") + '" data-row="' + r +
      '" data-id="' + c.id + '"><div class="row-head"><span class="id">identity ' + c.id + "</span>" +
      '<span class="badge">' + all.length + " faces</span>" +
      (c.split ? '<span class="badge">' + esc(c.split) + "</span>" : "") +
      '<span class="badge">outlier bar ' + c.bar.toFixed(3) + "</span>" +
      (c.flagged ? '<span class="badge flag">' + c.flagged + " flagged</span>" : "") +
      (merged ? '<span class="badge merge">merge &rarr; ' + esc(merged) + "</span>" : "") +
      "</div><div class=\"faces\">" + faces + more + "</div>" + singles + pairs + "</section>";
  }
  function render() {
    const start = ui.page * ui.pageSize;
    const rows = ui.view.slice(start, start + ui.pageSize);
    $("rows").innerHTML = rows.length
      ? rows.map((c, k) => rowHTML(c, start + k)).join("")
      : "<p>No identity matches the filters.</p>";
    $("page-info").textContent = "page " + (ui.page + 1) + " / " + pages() + " (" + ui.view.length + " identities)";
    markCursor(false);
    updateCount();
  }
  function currentCluster() { return ui.view[ui.row]; }
  function markCursor(scroll) {
    document.querySelectorAll(".row.current").forEach((e) => e.classList.remove("current"));
    document.querySelectorAll(".face.cursor").forEach((e) => e.classList.remove("cursor"));
    const row = document.querySelector('.row[data-row="' + ui.row + '"]');
    if (!row) return;
    row.classList.add("current");
    const face = row.querySelector('.face[data-pos="' + ui.face + '"]');
    if (face) face.classList.add("cursor");
    if (scroll && row.scrollIntoView) (face || row).scrollIntoView({ block: "nearest" });
  }
  function rerenderRow() {
    const c = currentCluster();
    const row = document.querySelector('.row[data-row="' + ui.row + '"]');
    if (!c || !row) return render();
    row.outerHTML = rowHTML(c, ui.row);
    markCursor(false);
    updateCount();
  }
  function updateCount() {
    const n = exportRows().length;
    $("decision-count").textContent = n + " decision" + (n === 1 ? "" : "s");
    const flagged = D.flagged.reduce((a, b) => a + b, 0);
    $("stats").textContent = D.paths.length + " faces, " + D.clusters.length + " identities, " + flagged +
      " flagged, threshold " + D.threshold;
  }

  // ------------------------------------------------------------------ decisions
  function currentFace() {
    const c = currentCluster();
    if (!c) return null;
    const list = faceList(c);
    return list[Math.min(ui.face, list.length - 1)];
  }
  function decide(action, value) {
    const i = currentFace();
    if (i === null || i === undefined) return;
    const path = D.paths[i];
    const d = state.faces[path];
    if (d && d.action === action && d.value === (value || "")) delete state.faces[path];
    else state.faces[path] = { action: action, value: value || "" };
    save();
    rerenderRow();
  }
  function mergeInto(target) {
    const c = currentCluster();
    if (!c) return;
    if (String(target) === String(c.id)) return message("an identity cannot merge into itself");
    state.merges[String(c.id)] = String(target);
    save();
    rerenderRow();
  }
  function undo() {
    const i = currentFace();
    const c = currentCluster();
    if (i !== null && i !== undefined && state.faces[D.paths[i]]) delete state.faces[D.paths[i]];
    else if (c && state.merges[String(c.id)]) delete state.merges[String(c.id)];
    save();
    rerenderRow();
  }
  function validTarget(v) {
    return /^new:.+/.test(v) || (/^-?\d+$/.test(v) && clusters.has(parseInt(v, 10)));
  }
  function ask(kind) {
    const c = currentCluster();
    if (!c) return;
    const i = currentFace();
    let guess = c.near.length ? String(c.near[0][0]) : "";
    if (kind === "move" && i !== undefined && D.identity[i] < 0) guess = String(c.id);
    ui.pending = kind;
    $("target-label").textContent = kind === "move"
      ? "Move " + D.paths[i] + " to identity:"
      : "Merge identity " + c.id + " into identity:";
    $("target-box").hidden = false;
    const input = $("target-input");
    input.value = guess;
    input.focus();
    input.select();
  }
  function closeAsk() {
    ui.pending = null;
    $("target-box").hidden = true;
    $("target-input").blur();
  }
  function confirmAsk() {
    const v = $("target-input").value.trim();
    if (!validTarget(v)) return message("no identity " + v + " (type a number shown on the page, or new:NAME)");
    const kind = ui.pending;
    closeAsk();
    message("");
    if (kind === "move") decide("move", v);
    else mergeInto(v);
  }

  // ------------------------------------------------------------------ corrections.csv
  function csvCell(s) { s = String(s); return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }
  function exportRows() {
    const rows = [];
    Object.keys(state.merges).map(Number).sort((a, b) => a - b).forEach((id) => {
      const c = clusters.get(id);
      if (c) rows.push([D.paths[c.medoid], "merge", state.merges[String(id)]]);
    });
    Object.keys(state.faces).sort().forEach((p) => rows.push([p, state.faces[p].action, state.faces[p].value]));
    return rows.concat(state.extra);
  }
  function exportCSV() {
    return ["path,action,value"].concat(exportRows().map((r) => r.map(csvCell).join(","))).join("\n") + "\n";
  }
  function download() {
    const blob = new Blob([exportCSV()], { type: "text/csv" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "corrections.csv";
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 0);
  }
  function parseCSV(text) {
    const rows = [];
    let row = [], cell = "", quoted = false;
    for (let k = 0; k < text.length; k++) {
      const ch = text[k];
      if (quoted) {
        if (ch === '"' && text[k + 1] === '"') { cell += '"'; k++; }
        else if (ch === '"') quoted = false;
        else cell += ch;
      } else if (ch === '"') quoted = true;
      else if (ch === ",") { row.push(cell); cell = ""; }
      else if (ch === "\n" || ch === "\r") {
        if (ch === "\r" && text[k + 1] === "\n") k++;
        row.push(cell); rows.push(row); row = []; cell = "";
      } else cell += ch;
    }
    if (cell !== "" || row.length) { row.push(cell); rows.push(row); }
    return rows.filter((r) => r.some((c) => c.trim() !== "") && !r[0].trim().startsWith("#"));
  }
  function loadCSV(text) {
    const rows = parseCSV(text);
    if (!rows.length) return message("empty corrections file");
    const head = rows[0].map((h) => h.trim().toLowerCase());
    const col = { path: head.indexOf("path"), action: head.indexOf("action"), value: head.indexOf("value") };
    if (col.path < 0 || col.action < 0 || col.value < 0) return message("corrections file needs columns path, action, value");
    const next = { faces: {}, merges: {}, extra: [] };
    let unmatched = 0;
    rows.slice(1).forEach((r) => {
      const path = (r[col.path] || "").trim(), action = (r[col.action] || "").trim().toLowerCase();
      const value = (r[col.value] || "").trim();
      const i = indexOf.get(path);
      if (i === undefined || ["drop", "singleton", "move", "merge"].indexOf(action) < 0) {
        next.extra.push([path, action, value]);
        unmatched++;
      } else if (action === "merge" && D.identity[i] >= 0) next.merges[String(D.identity[i])] = value;
      else next.faces[path] = { action: action === "merge" ? "move" : action, value: value };
    });
    state = next;
    save();
    render();
    message("loaded " + (rows.length - 1) + " rows" + (unmatched ? ", " + unmatched + " match nothing on this page (kept)" : ""));
  }

  // ------------------------------------------------------------------ references
  function showRefs(i) {
    const refs = D.refs[String(i)];
    if (!refs) return message(D.paths[i] + " has no reference list");
    $("refs-title").textContent = "references of " + D.paths[i] + " (" + refs[0] + ")";
    $("refs-body").innerHTML = refs[1].map((r) => '<div class="face" title="' + esc(D.paths[r]) + '">' + thumb(r) +
      '<div class="d">id ' + D.identity[r] + "</div></div>").join("") +
      (refs[0] > refs[1].length ? "<p>first " + refs[1].length + " shown</p>" : "");
    $("refs-panel").hidden = false;
  }

  // ------------------------------------------------------------------ navigation
  function moveRow(step) {
    if (!ui.view.length) return;
    ui.row = Math.min(Math.max(0, ui.row + step), ui.view.length - 1);
    ui.face = 0;
    const page = Math.floor(ui.row / ui.pageSize);
    if (page !== ui.page) { ui.page = page; render(); }
    markCursor(true);
  }
  function moveFace(step) {
    const c = currentCluster();
    if (!c) return;
    const n = faceList(c).length;
    ui.face = Math.min(Math.max(0, ui.face + step), n - 1);
    if (ui.face >= MAX_FACES && ui.face < c.faces.length && !ui.expanded.has(c.id)) {
      ui.expanded.add(c.id);
      rerenderRow();
    }
    markCursor(true);
  }

  document.addEventListener("keydown", (ev) => {
    if (ui.pending) {
      if (ev.key === "Enter") { ev.preventDefault(); confirmAsk(); }
      else if (ev.key === "Escape") { ev.preventDefault(); closeAsk(); }
      return;
    }
    const tag = (ev.target && ev.target.tagName) || "";
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const keys = {
      j: () => moveRow(1), ArrowDown: () => moveRow(1), k: () => moveRow(-1), ArrowUp: () => moveRow(-1),
      l: () => moveFace(1), ArrowRight: () => moveFace(1), h: () => moveFace(-1), ArrowLeft: () => moveFace(-1),
      d: () => decide("drop"), s: () => decide("singleton"), m: () => ask("move"), g: () => ask("merge"),
      u: undo, r: () => { const i = currentFace(); if (i !== undefined) showRefs(i); },
      n: () => gotoPage(ui.page + 1), p: () => gotoPage(ui.page - 1),
      f: () => { $("f-flagged").checked = !$("f-flagged").checked; applyFilters(); },
      e: download, Escape: () => { $("refs-panel").hidden = true; },
    };
    const fn = keys[ev.key];
    if (fn) { ev.preventDefault(); fn(); }
  });
  $("rows").addEventListener("click", (ev) => {
    const t = ev.target;
    const rowEl = t.closest(".row");
    if (!rowEl) return;
    ui.row = parseInt(rowEl.dataset.row, 10);
    if (t.dataset.mergeInto) { mergeInto(t.dataset.mergeInto); return; }
    if (t.dataset.splitLabel) { splitLabel(currentCluster(), parseInt(t.dataset.splitLabel, 10)); return; }
    if (t.dataset.expand) { ui.expanded.add(parseInt(t.dataset.expand, 10)); rerenderRow(); return; }
    if (t.dataset.refs) { showRefs(parseInt(t.dataset.refs, 10)); return; }
    const face = t.closest(".face");
    ui.face = face ? parseInt(face.dataset.pos, 10) : 0;
    markCursor(false);
  });
  ["f-flagged", "f-near", "f-min", "f-max", "f-split", "f-sort", "f-page"].forEach((id) =>
    $(id).addEventListener("change", () => applyFilters(currentCluster() && currentCluster().id)));
  $("prev-page").addEventListener("click", () => gotoPage(ui.page - 1));
  $("next-page").addEventListener("click", () => gotoPage(ui.page + 1));
  $("export").addEventListener("click", download);
  $("clear").addEventListener("click", () => { state = { faces: {}, merges: {}, extra: [] }; save(); render(); });
  $("target-ok").addEventListener("click", confirmAsk);
  $("target-cancel").addEventListener("click", closeAsk);
  $("refs-close").addEventListener("click", () => { $("refs-panel").hidden = true; });
  $("load").addEventListener("change", (ev) => {
    const file = ev.target.files && ev.target.files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => loadCSV(String(reader.result));
    reader.readAsText(file);
    ev.target.value = "";
  });

  // Hooks for scripts and tests: the CSV the Export button downloads, and a render report.
  window.refface = {
    exportCSV: exportCSV,
    loadCSV: loadCSV,
    status: function () {
      const imgs = Array.from(document.images);
      return {
        rows: document.querySelectorAll(".row").length,
        images: imgs.length,
        loaded: imgs.filter((im) => im.complete && im.naturalWidth > 0).length,
        broken: imgs.filter((im) => im.complete && im.naturalWidth === 0 && im.getAttribute("src")).length,
        row: ui.row, face: ui.face, page: ui.page,
      };
    },
  };
  applyFilters();
})();
