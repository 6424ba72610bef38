/* camserve report viewer: the gallery, filters, sorting, summary and detail view of a batch job.
 *
 * Data arrives as script files beside the page (report_files/data-<token>/*.js), each one call of
 * camserveReport.receive(kind, n, payload): the manifest, then every index chunk (gallery rows),
 * and a detail chunk when one of its rows is opened. Every value from the data is written with
 * textContent or as an element property (never as markup); URLs are relative paths made by the
 * generator and checked again here. The page's Content-Security-Policy allows no inline script.
 */
(function () {
  "use strict";

  const S = {
    m: null,            // the manifest
    chunks: [],         // index chunks as they arrive
    rows: [],           // every gallery row, in job order
    view: [],           // the rows that pass the filters, sorted
    page: 0,
    details: [],        // detail chunks loaded so far
    waiting: new Map(), // detail chunk -> Promise
    cur: -1,            // position in view of the open detail
    timing: {},
  };

  const $ = (id) => document.getElementById(id);

  /* An element with a class and text (text is always a text node). */
  function h(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  /* A relative URL from the generator, or null: anything with a scheme, a protocol-relative
   * or backslashed start is refused (the generator never writes one). */
  function safeUrl(u) {
    if (typeof u !== "string" || u === "") return null;
    if (/^[\u0000-\u0020]*[A-Za-z][A-Za-z0-9+.-]*:/.test(u) || /^[\u0000-\u0020]*[/\\]/.test(u)) return null;
    return u;
  }

  function fmt(v, digits) {
    if (typeof v !== "number" || !isFinite(v)) return "–";
    return v.toFixed(digits === undefined ? 3 : digits);
  }

  function pad5(n) { return String(n).padStart(5, "0"); }

  function setStatus(text, bad) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("bad", !!bad);
    if (bad) document.documentElement.dataset.state = "error";
  }

  function loadScript(src) {
    return new Promise(function (resolve, reject) {
      const s = document.createElement("script");
      s.src = src;
      s.async = false;
      s.addEventListener("load", function () { resolve(); }, { once: true });
      s.addEventListener("error", function () { reject(new Error("cannot load " + src)); }, { once: true });
      document.body.appendChild(s);
    });
  }

  /* -- data ------------------------------------------------------------------------------------ */

  function receive(kind, n, payload) {
    if (kind === "manifest") onManifest(payload);
    else if (kind === "index") S.chunks[n] = payload;
    else if (kind === "detail") S.details[n] = payload;
  }

  function onManifest(m) {
    S.m = m;
    S.timing.manifest = performance.now();
    document.title = m.title;
    $("title").textContent = m.title;
    setStatus("Loading " + m.rows + " rows…");
    const loads = [];
    for (let n = 0; n < m.indexChunks; n++) loads.push(loadScript(m.data + "index-" + pad5(n) + ".js"));
    Promise.all(loads).then(function () {
      for (let n = 0; n < m.indexChunks; n++) {
        if (!Array.isArray(S.chunks[n])) throw new Error("index chunk " + n + " is missing");
        for (const r of S.chunks[n]) S.rows.push(r);
      }
      S.chunks = [];
      S.timing.index = performance.now();
      start();
    }).catch(function (err) {
      setStatus("The report's data could not be loaded (" + err.message + "); generate it again with camserve-report.", true);
    });
  }

  function detailOf(i) {
    const per = S.m.detailRows, n = Math.floor(i / per);
    if (S.details[n]) return Promise.resolve(S.details[n][i % per]);
    if (!S.waiting.has(n)) {
      S.waiting.set(n, loadScript(S.m.data + "detail-" + pad5(n) + ".js").then(function () {
        if (!S.details[n]) throw new Error("detail chunk " + n + " is missing");
      }));
    }
    return S.waiting.get(n).then(function () { return S.details[n][i % per]; });
  }

  /* -- summary ----------------------------------------------------------------------------------- */

  function start() {
    renderSummary();
    initControls();
    apply();
    $("summary").hidden = false;
    $("controls").hidden = false;
    const c = S.m.counts;
    setStatus(c.results + " images, " + c.errors + " errors · generated " + S.m.generated + " · " + S.m.job);
    S.timing.render = performance.now();
    document.documentElement.dataset.state = "ready";
  }

  function countItem(dl, name, value, cls) {
    const dt = h("dt", null, name), dd = h("dd", cls, value);
    dl.append(dt, dd);
  }

  function renderSummary() {
    const m = S.m, c = m.counts, dl = $("counts");
    countItem(dl, "Images explained", c.results);
    countItem(dl, "Errors", c.errors, c.errors ? "bad" : null);
    if (c.previewFailures) countItem(dl, "Failed previews", c.previewFailures, "warn");
    const malformed = c.malformedResults + c.malformedErrors;
    if (malformed) countItem(dl, "Malformed lines (skipped)", malformed, "warn");
    const tasks = m.tasks.filter(function (t) { return t !== "error"; });
    if (tasks.length > 1 || (tasks.length === 1 && tasks[0] !== "classification")) countItem(dl, "Tasks", tasks.join(", "));
    if (m.methods.length) countItem(dl, "Methods", m.methods.join(", "));
    countItem(dl, "Thumbnails made now", c.thumbsMade);

    const bars = $("label-counts"), top = m.labelCounts.slice(0, 25);
    const most = top.length ? top[0][1] : 1;
    for (const [id, count] of top) {
      const li = h("li", "bar-row");
      const name = h("button", "bar-name", m.labels[id]);
      name.type = "button";
      name.title = "show only " + m.labels[id];
      name.addEventListener("click", function () { $("f-label").value = String(id); S.page = 0; apply(); });
      const bar = h("span", "bar");
      bar.style.width = (100 * count / most).toFixed(1) + "%";
      li.append(name, h("span", "bar-track"), h("span", "bar-count", count));
      li.children[1].append(bar);
      bars.append(li);
    }
    if (m.labelCounts.length > top.length) bars.append(h("li", "more", "+ " + (m.labelCounts.length - top.length) + " more labels (see the label filter)"));
    if (!top.length) bars.append(h("li", "more", "no predictions"));

    const hist = $("histogram"), peak = Math.max(1, ...m.histogram), bins = m.histogram.length;
    m.histogram.forEach(function (count, k) {
      const b = h("span", "hbar");
      b.style.height = (100 * count / peak).toFixed(1) + "%";
      b.title = (k / bins).toFixed(2) + "–" + ((k + 1) / bins).toFixed(2) + ": " + count;
      const col = h("span", "hcol");
      col.append(b);
      hist.append(col);
    });

    const keys = Object.keys(m.metricMeans);
    if (keys.length) {
      $("metrics-panel").hidden = false;
      const t = $("metric-means");
      t.append(headRow(["metric", "mean", "images", "better"]));
      for (const k of m.metricKeys) {
        const v = m.metricMeans[k];
        if (!v) continue;
        t.append(row([k, fmt(v.mean, 4), v.n, m.lowerIsBetter.includes(k) ? "lower" : "higher"]));
      }
    }

    if (c.errors) {
      $("errors-panel").hidden = false;
      const chips = $("error-types");
      for (const [id, count] of m.errorCounts) chips.append(h("span", "chip bad", m.errorTypes[id] + " × " + count));
      const show = h("button", "link", "show all " + c.errors + " in the gallery");
      show.type = "button";
      show.addEventListener("click", function () { $("f-status").value = "errors"; S.page = 0; apply(); scrollToGallery(); });
      chips.append(show);
      const t = $("error-list");
      t.append(headRow(["path", "type", "reason"]));
      for (const e of m.errorList) t.append(row([e.p, e.t, e.r], e.i));
    }
    if (c.previewFailures) {
      $("previews-panel").hidden = false;
      if (c.missingOriginals) {
        $("previews-panel").insertBefore(h("p", "note", c.missingOriginals + " original images were not found: the report resolves relative paths against the folder camserve-report ran in (or --input-root), which should be the folder the batch job ran in."), $("preview-list"));
      }
      const show = h("button", "link", "show all " + c.previewFailures + " in the gallery");
      show.type = "button";
      show.addEventListener("click", function () { $("f-status").value = "previews"; S.page = 0; apply(); scrollToGallery(); });
      $("previews-panel").insertBefore(show, $("preview-list"));
      const t = $("preview-list");
      t.append(headRow(["path", "reason"]));
      for (const e of m.previewList) t.append(row([e.p, e.r], e.i));
    }
  }

  function headRow(cells) {
    const tr = h("tr");
    for (const c of cells) tr.append(h("th", null, c));
    return tr;
  }

  /* A table row of text cells; with a row index, clicking it opens that row's detail. */
  function row(cells, index) {
    const tr = h("tr");
    for (const c of cells) tr.append(h("td", null, c));
    if (index !== undefined) {
      tr.className = "clickable";
      tr.addEventListener("click", function () { openRow(index); });
    }
    return tr;
  }

  function scrollToGallery() { $("controls").scrollIntoView({ block: "start" }); }

  /* -- filters and sorting ----------------------------------------------------------------------- */

  function option(value, text) {
    const o = h("option", null, text);
    o.value = value;
    return o;
  }

  function initControls() {
    const m = S.m, lab = $("f-label");
    const byName = m.labelCounts.map(function (lc) { return lc[0]; });
    for (const id of byName) lab.append(option(String(id), m.labels[id] + " (" + m.labelCounts.find(function (lc) { return lc[0] === id; })[1] + ")"));
    const sort = $("f-sort");
    sort.append(option("score", "score"), option("path", "path"), option("label", "label"), option("order", "job order"));
    m.metricKeys.forEach(function (k, j) { sort.append(option("x" + j, "metric: " + k)); });
    let timer = 0;
    $("f-text").addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { S.page = 0; apply(); }, 150);
    });
    for (const id of ["f-label", "f-status", "f-sort", "f-order"]) $(id).addEventListener("change", function () { S.page = 0; apply(); });
    $("f-size").addEventListener("change", function () { S.page = 0; renderPage(); });
    $("d-close").addEventListener("click", closeDetail);
    $("d-prev").addEventListener("click", function () { step(-1); });
    $("d-next").addEventListener("click", function () { step(1); });
    $("detail").addEventListener("keydown", function (ev) {
      if (ev.key === "ArrowLeft") { ev.preventDefault(); step(-1); }
      else if (ev.key === "ArrowRight") { ev.preventDefault(); step(1); }
    });
    $("detail").addEventListener("close", function () { S.cur = -1; });
  }

  function sortKey(name) {
    const m = S.m;
    if (name === "score") return function (r) { return r.s; };
    if (name === "path") return function (r) { return r.p; };
    if (name === "order") return function (r) { return r.i; };
    if (name === "label") return function (r) { return r.l ? m.labels[r.l[0]] : (r.e !== undefined ? m.errorTypes[r.e] : undefined); };
    const j = Number(name.slice(1));
    return function (r) { return r.x ? r.x[j] : undefined; };
  }

  function apply() {
    const text = $("f-text").value.trim().toLowerCase();
    const label = $("f-label").value === "" ? -1 : Number($("f-label").value);
    const status = $("f-status").value;
    const view = [];
    for (const r of S.rows) {
      const err = r.e !== undefined;
      if (status === "results" && err) continue;
      if (status === "errors" && !err) continue;
      if (status === "previews" && (err || !r.r)) continue;
      if (label >= 0 && !(r.l && r.l.indexOf(label) >= 0)) continue;
      if (text) {
        if (r.lp === undefined) r.lp = r.p.toLowerCase();
        if (r.lp.indexOf(text) < 0) continue;
      }
      view.push(r);
    }
    const key = sortKey($("f-sort").value || "score"), sign = $("f-order").value === "asc" ? 1 : -1;
    view.sort(function (a, b) {
      const x = key(a), y = key(b);
      const xm = x === undefined || x === null, ym = y === undefined || y === null;
      if (xm || ym) return xm === ym ? a.i - b.i : (xm ? 1 : -1);   // missing values last
      if (x < y) return -sign;
      if (x > y) return sign;
      return a.i - b.i;
    });
    S.view = view;
    renderPage();
  }

  /* -- gallery ------------------------------------------------------------------------------------ */

  function pageSize() { return Number($("f-size").value) || 100; }

  function renderPage() {
    const size = pageSize(), pages = Math.max(1, Math.ceil(S.view.length / size));
    S.page = Math.min(Math.max(0, S.page), pages - 1);
    const first = S.page * size, slice = S.view.slice(first, first + size);
    const cards = [];
    slice.forEach(function (r, k) { cards.push(card(r, first + k)); });
    const g = $("gallery");
    g.replaceChildren(...cards);
    if (!S.view.length) g.append(h("p", "empty", S.rows.length ? "Nothing matches these filters." : "This job has no results and no errors."));
    $("shown").textContent = S.view.length + " of " + S.rows.length + " shown";
    for (const id of ["pager-top", "pager"]) renderPager($(id), pages);
  }

  function renderPager(nav, pages) {
    nav.hidden = pages <= 1;
    const btn = function (text, page, title) {
      const b = h("button", null, text);
      b.type = "button";
      b.title = title;
      b.disabled = page < 0 || page >= pages || page === S.page;
      b.addEventListener("click", function () { S.page = page; renderPage(); });
      return b;
    };
    nav.replaceChildren(btn("«", 0, "first page"), btn("‹", S.page - 1, "previous page"),
      h("span", "page-no", "page " + (S.page + 1) + " of " + pages),
      btn("›", S.page + 1, "next page"), btn("»", pages - 1, "last page"));
  }

  function placeholder(text) {
    const p = h("div", "placeholder");
    p.append(h("span", null, text));
    return p;
  }

  function pct(v) { return (100 * v).toFixed(3) + "%"; }

  /* A box [x0, y0, x1, y1] as fractions of the image, drawn over a positioned frame. */
  function boxDiv(b, cls, text) {
    const d = h("div", "box " + cls);
    d.style.left = pct(b[0]);
    d.style.top = pct(b[1]);
    d.style.width = pct(Math.max(0, b[2] - b[0]));
    d.style.height = pct(Math.max(0, b[3] - b[1]));
    if (text) d.append(h("span", "box-label", text));
    return d;
  }

  /* A gallery thumbnail: the image (a segmentation row's: with its mask in colour) or the
   * overlay, with the detection boxes over the image. */
  function thumb(r, kind) {
    const t = S.m.thumbs, wrap = h("div", "thumb");
    if (kind === "image" && (r.f & t.flags.mask)) kind = "mask";
    const url = safeUrl(r.k ? r.k + t[kind] : null);
    if (!(r.f & t.flags[kind]) || !url) {
      wrap.append(placeholder(kind === "image" ? "no image preview" : "no overlay"));
      return wrap;
    }
    const frame = h("div", "frame");
    const img = new Image();
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = kind;
    img.addEventListener("error", function () { frame.replaceWith(placeholder("preview missing")); }, { once: true });
    img.src = url;
    frame.append(img);
    if (kind !== "overlay" && r.b) for (const b of r.b) frame.append(boxDiv(b, "det"));
    wrap.append(frame);
    return wrap;
  }

  function labelText(r) {
    const m = S.m;
    if (!r.l || !r.l.length) return "";
    const names = r.l.slice(0, 3).map(function (id) { return m.labels[id]; });
    return names.join(", ") + (r.l.length > 3 ? " +" + (r.l.length - 3) : "");
  }

  function card(r, pos) {
    const m = S.m, err = r.e !== undefined;
    const a = h("article", "card" + (err ? " error" : "") + (!err && r.r ? " warn" : ""));
    a.tabIndex = 0;
    a.dataset.row = String(r.i);
    const thumbs = h("div", "thumbs");
    if (err) thumbs.append(placeholder(m.errorTypes[r.e]));
    else thumbs.append(thumb(r, "image"), thumb(r, "overlay"));
    const path = h("p", "path"), cut = r.p.lastIndexOf("/") + 1;   // the file name never hides
    path.append(h("span", "dir", r.p.slice(0, cut)), h("span", "file", r.p.slice(cut)));
    path.title = r.p;
    a.append(thumbs, path);
    if (err) {
      a.append(h("p", "reason", r.r));
    } else {
      const pred = h("p", "pred");
      pred.append(h("span", "label", labelText(r)), h("span", "score", r.s !== undefined ? fmt(r.s) : ""),
        h("span", "method", r.m !== undefined ? m.methods[r.m] : ""));
      a.append(pred);
      if (r.x) {
        const dl = h("dl", "metrics");
        m.metricKeys.forEach(function (k, j) {
          if (r.x[j] === null || r.x[j] === undefined) return;
          dl.append(h("dt", null, k), h("dd", null, fmt(r.x[j])));
        });
        a.append(dl);
      }
      if (r.r) a.append(h("p", "reason", r.r));
    }
    a.addEventListener("click", function () { openDetail(pos); });
    a.addEventListener("keydown", function (ev) { if (ev.key === "Enter") openDetail(pos); });
    return a;
  }

  /* -- detail ------------------------------------------------------------------------------------- */

  function openRow(index) {
    let pos = S.view.findIndex(function (r) { return r.i === index; });
    if (pos < 0) {   // not in the filtered view: show everything in job order
      $("f-text").value = "";
      $("f-label").value = "";
      $("f-status").value = "all";
      apply();
      pos = S.view.findIndex(function (r) { return r.i === index; });
    }
    if (pos >= 0) openDetail(pos);
  }

  function openDetail(pos) {
    const r = S.view[pos];
    if (!r) return;
    S.cur = pos;
    const dlg = $("detail");
    if (!dlg.open) dlg.showModal();
    $("d-path").textContent = r.p;
    $("d-prev").disabled = pos <= 0;
    $("d-next").disabled = pos >= S.view.length - 1;
    $("d-body").replaceChildren(h("p", "status", "Loading…"));
    detailOf(r.i).then(function (d) {
      if (S.cur !== pos) return;
      $("d-body").replaceChildren(detailBody(r, d || {}));
    }).catch(function (err) {
      if (S.cur === pos) $("d-body").replaceChildren(h("p", "status bad", err.message));
    });
  }

  function step(delta) {
    if (S.cur < 0) return;
    const pos = S.cur + delta;
    if (pos < 0 || pos >= S.view.length) return;
    openDetail(pos);
  }

  function closeDetail() {
    const pos = S.cur, dlg = $("detail");
    if (dlg.open) dlg.close();
    if (pos >= 0) {
      const page = Math.floor(pos / pageSize());
      if (page !== S.page) { S.page = page; renderPage(); }
    }
  }

  function boxFractions(b, w, hgt) {
    return [b[0] / w, b[1] / hgt, b[2] / w, b[3] / hgt];
  }

  /* A figure: an image in a positioned frame, with boxes drawn over it. ``boxes``: [[box in
   * original pixels, css class, text]]; ``fallback``: a URL (the thumbnail) shown when ``url``
   * cannot be loaded, with ``note``. */
  function figure(caption, url, d, boxes, extra) {
    const f = h("figure", "fig");
    const frame = h("div", "frame");
    const img = new Image();
    img.alt = caption;
    img.decoding = "async";
    const cap = h("figcaption", null, caption);
    const draw = function (w, hgt) {
      if (!(w > 0 && hgt > 0)) return;
      for (const [b, cls, text] of boxes || []) if (b) frame.append(boxDiv(boxFractions(b, w, hgt), cls, text));
    };
    const size = d.width && d.height ? [d.width, d.height] : null;
    let fellBack = false;
    img.addEventListener("error", function () {
      if (extra && extra.fallback && !fellBack) {
        fellBack = true;
        img.src = extra.fallback;
        f.append(h("p", "note", extra.note));
      } else {
        frame.replaceWith(placeholder("cannot load this file"));
      }
    });
    if (!size) img.addEventListener("load", function () {
      if (!fellBack) draw(img.naturalWidth, img.naturalHeight);
    }, { once: true });
    img.src = url;
    frame.append(img);
    if (extra && extra.layer) {
      const layer = new Image();
      layer.className = "layer";
      layer.alt = "";
      layer.src = extra.layer;
      frame.append(layer);
    }
    if (size) draw(size[0], size[1]);
    f.append(frame, cap);
    return f;
  }

  function facts(pairs) {
    const dl = h("dl", "facts");
    for (const [k, v] of pairs) if (v !== undefined && v !== null && v !== "") dl.append(h("dt", null, k), h("dd", null, v));
    return dl;
  }

  function table(title, head, rows) {
    const s = h("section", "part");
    s.append(h("h3", null, title));
    const t = h("table", "table");
    t.append(headRow(head));
    for (const cells of rows) {
      const tr = h("tr");
      for (const c of cells) {
        const td = h("td");
        if (c instanceof Node) td.append(c); else td.textContent = c === null || c === undefined ? "–" : String(c);
        tr.append(td);
      }
      t.append(tr);
    }
    s.append(t);
    return s;
  }

  function scoreBar(v) {
    const w = h("span", "score-cell");
    const bar = h("span", "bar");
    bar.style.width = (typeof v === "number" && isFinite(v) ? Math.max(0, Math.min(1, v)) * 100 : 0).toFixed(1) + "%";
    const track = h("span", "bar-track");
    track.append(bar);
    w.append(track, h("span", null, fmt(v)));
    return w;
  }

  function swatch(color) {
    const s = h("span", "swatch");
    if (Array.isArray(color) && color.length === 3 && color.every(function (c) { return Number.isInteger(c) && c >= 0 && c < 256; })) {
      s.style.backgroundColor = "rgb(" + color.join(",") + ")";
    }
    return s;
  }

  function boxText(b) { return b ? "[" + b.join(", ") + "]" : "–"; }

  function links(pairs) {
    const p = h("p", "links");
    for (const [text, u] of pairs) {
      const url = safeUrl(u);
      if (!url) continue;
      const a = h("a", null, text);
      a.href = url;
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      p.append(a);
    }
    return p.childNodes.length ? p : h("span");
  }

  function detailBody(r, d) {
    const m = S.m, body = h("div", "detail-grid");
    if (d.error) {
      body.append(facts([["Path", d.path], ["Error", d.error.type], ["Reason", d.error.reason]]));
      return body;
    }
    const thumbUrl = safeUrl(r.k && (r.f & m.thumbs.flags.image) ? r.k + m.thumbs.image : null);
    const figs = h("div", "figs");
    const camBox = d.bbox ? [[d.bbox, "cam", "Grad-CAM box"]] : [];
    const dets = d.detections || [];
    const detBoxes = dets.map(function (x, k) { return [x.box, "det", (k + 1) + ". " + (x.label || "?") + " " + fmt(x.score, 2)]; });
    const seg = d.segmentation;
    const layer = seg && (r.f & m.thumbs.flags.mask) ? safeUrl(seg.overlay) : null;
    const original = safeUrl(d.url);
    if (original) {
      figs.append(figure("image", original, d, camBox.concat(detBoxes), {
        fallback: thumbUrl, layer: layer,
        note: "The original is not reachable from this page (moved, or outside what this server serves); showing its thumbnail.",
      }));
    }
    const files = d.files || {};
    if (safeUrl(files.overlay)) figs.append(figure("overlay", files.overlay, d, camBox));
    if (safeUrl(files.heatmap)) figs.append(figure("heatmap", files.heatmap, d, camBox));
    dets.forEach(function (x, k) {
      const ex = x.explanation || {}, box = [[x.box, "det", null], [ex.bbox, "cam", null]];
      const name = (k + 1) + ". " + (x.label || "?");
      if (safeUrl(ex.overlay)) figs.append(figure(name + ": overlay", ex.overlay, d, box));
      if (safeUrl(ex.heatmap)) figs.append(figure(name + ": heatmap", ex.heatmap, d, box));
    });
    body.append(figs);
    if (layer) {   // the mask over the original: on by default, a switch to look under it
      const lab = h("label", "toggle"), box = h("input");
      box.type = "checkbox";
      box.checked = true;
      box.id = "d-mask";
      box.addEventListener("change", function () {
        for (const l of figs.querySelectorAll("img.layer")) l.hidden = !box.checked;
      });
      lab.append(box, document.createTextNode(" segmentation mask"));
      figs.prepend(lab);
    }

    const side = h("div", "side");
    const t = d.target || {};
    side.append(facts([
      ["Path", d.path], ["Output name", d.name], ["Task", d.task],
      ["Explained", t.label !== undefined && t.label !== null ? t.label + (t.index !== null && t.index !== undefined ? " (" + t.index + ")" : "") : null],
      ["Score", t.score !== undefined && t.score !== null ? fmt(t.score, 6) : (r.s !== undefined ? fmt(r.s, 6) : null)],
      ["Method", d.method], ["Layer", d.layer],
      ["Size", d.width && d.height ? d.width + " × " + d.height : null],
      ["Grad-CAM box", d.bbox ? boxText(d.bbox) : null],
      ["Preview problems", r.r],
    ]));
    if (d.topk && d.topk.length) {
      side.append(table("Top " + d.topk.length, ["label", "index", "score"],
        d.topk.map(function (p) { return [p.label, p.index, scoreBar(p.score)]; })));
    }
    if (d.labels && d.labels.length) {
      side.append(table("Labels", ["label", "index", "score"],
        d.labels.map(function (p) { return [p.label, p.index, scoreBar(p.score)]; })));
    }
    if (dets.length) {
      side.append(table("Detections", ["#", "label", "score", "box", "method"],
        dets.map(function (x, k) { return [k + 1, x.label, scoreBar(x.score), boxText(x.box), (x.explanation || {}).method]; })));
    }
    if (seg && seg.classes && seg.classes.length) {
      side.append(table("Segmentation", ["", "label", "index", "share"],
        seg.classes.map(function (c) { return [swatch(c.color), c.label, c.index, scoreBar(c.share)]; })));
    }
    const mk = Object.keys(d.metrics || {});
    if (mk.length) {
      side.append(table("Metrics", ["metric", "value", "better"],
        mk.map(function (k) { return [k, fmt(d.metrics[k], 4), m.lowerIsBetter.includes(k) ? "lower" : "higher"]; })));
    }
    const fileLinks = [["original", d.url], ["overlay", files.overlay], ["heatmap", files.heatmap], ["raw map (.npy)", files.npy]];
    if (seg) fileLinks.push(["mask", seg.mask]);
    side.append(links(fileLinks));
    if (d.raw) {
      const det = h("details", "raw");
      det.append(h("summary", null, "results.jsonl line"), h("pre", null, d.raw));
      side.append(det);
    }
    body.append(side);
    return body;
  }

  Object.defineProperty(window, "camserveReport", {
    value: Object.freeze({ receive: receive, timing: S.timing }),
    writable: false, configurable: false, enumerable: false,
  });
})();
