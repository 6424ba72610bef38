/* camserve viewer: explain one uploaded image with the predictor serving this page.
 *
 * It reads the model's name from the page, asks GET /v1/models/NAME/describe for the labels,
 * methods and defaults, and sends the image to POST /v1/models/NAME:explain: the predictor's own
 * API, from the same origin, nothing else. Every value from an answer is written with
 * textContent or as an element property (never as markup); overlays are shown as data: URLs of
 * the answer's base64 PNGs. The page's Content-Security-Policy allows no inline script.
 */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const S = { model: "", describe: null, preview: null, busy: false };

  function h(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function fmt(v, digits) {
    return typeof v === "number" && isFinite(v) ? v.toFixed(digits === undefined ? 4 : digits) : "–";
  }

  function setStatus(text, bad) {
    $("status").textContent = text;
    $("status").classList.toggle("bad", !!bad);
    document.documentElement.dataset.state = bad ? "error" : (S.busy ? "busy" : "ready");
  }

  function modelPath(suffix) {
    return "/v1/models/" + encodeURIComponent(S.model) + suffix;
  }

  /* {status, body}: the JSON body, or {message: text} when it is not JSON. */
  function call(path, body) {
    const init = { credentials: "same-origin", cache: "no-store", headers: {} };
    if (body !== undefined) {
      init.method = "POST";
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (r) {
      return r.text().then(function (text) {
        let parsed;
        try { parsed = JSON.parse(text); } catch (e) { parsed = { message: text.slice(0, 500) }; }
        return { status: r.status, body: parsed };
      });
    });
  }

  function errorText(status, b) {
    if (b && typeof b === "object") {
      const type = typeof b.type === "string" ? b.type : "HTTP " + status;
      const msg = typeof b.message === "string" ? b.message : (typeof b.error === "string" ? b.error : (typeof b.detail === "string" ? b.detail : ""));
      return type + (msg ? ": " + msg : "");
    }
    return "HTTP " + status;
  }

  /* -- the model's description ------------------------------------------------------------------ */

  function option(value, text, selected) {
    const o = h("option", null, text);
    o.value = String(value);
    o.selected = !!selected;
    return o;
  }

  function init() {
    const meta = document.querySelector('meta[name="camserve-model"]');
    S.model = meta ? meta.content : "";
    call(modelPath("/describe")).then(function (r) {
      if (r.status !== 200) throw new Error(errorText(r.status, r.body));
      onDescribe(r.body);
    }).catch(function (err) {
      setStatus("The model's description could not be read: " + err.message, true);
    });
    $("file").addEventListener("change", onFile);
    $("form").addEventListener("submit", function (ev) { ev.preventDefault(); explain(); });
    $("targets").addEventListener("change", checkTargets);
  }

  function onDescribe(d) {
    S.describe = d;
    const labels = Array.isArray(d.labels) ? d.labels : [];
    const methods = Array.isArray(d.methods) ? d.methods : [];
    const defaults = d.defaults || {};
    const ms = $("method");
    for (const m of methods) {
      if (!m || typeof m.name !== "string") continue;
      const needs = Array.isArray(m.needs) ? m.needs.join(", ") : "";
      const o = option(m.name, m.name, m.name === defaults.method);
      o.title = needs + (typeof m.forwards === "number" ? " · " + m.forwards + " forwards" : "");
      ms.append(o);
    }
    const ts = $("targets");
    labels.forEach(function (label, i) { ts.append(option(i, i + ": " + label)); });
    const topk = $("topk");
    topk.max = String(Math.max(1, labels.length));
    topk.value = String(defaults.topk || Math.min(3, labels.length) || 1);
    $("hint").textContent = "Task " + d.task + " · " + labels.length + " labels · no target selected: the model's default (its top prediction) · at most " + d.max_targets + " targets.";
    $("form").hidden = false;
    setStatus("Pick an image, a method and targets, then Explain.");
  }

  function checkTargets() {
    const n = $("targets").selectedOptions.length, most = S.describe ? S.describe.max_targets : 0;
    const over = most && n > most;
    $("explain").disabled = over || !$("file").files.length || S.busy;
    if (over) setStatus(n + " targets selected: at most " + most + ".", true);
  }

  function onFile() {
    if (S.preview) URL.revokeObjectURL(S.preview);
    const f = $("file").files[0];
    S.preview = f ? URL.createObjectURL(f) : null;
    $("figures").replaceChildren();
    $("side").replaceChildren();
    if (f) $("figures").append(figure("uploaded: " + f.name, S.preview, null));
    checkTargets();
  }

  /* -- explaining --------------------------------------------------------------------------------- */

  function base64(buf) {
    const bytes = new Uint8Array(buf);
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }

  function explain() {
    const f = $("file").files[0];
    if (!f || S.busy) return;
    S.busy = true;
    $("explain").disabled = true;
    setStatus("Explaining " + f.name + "…");
    const t0 = performance.now();
    f.arrayBuffer().then(function (buf) {
      const inst = { data: base64(buf), method: $("method").value, outputs: "overlay,bbox" };
      const k = Number($("topk").value);
      if (Number.isInteger(k) && k > 0) inst.topk = k;
      const targets = Array.from($("targets").selectedOptions).map(function (o) { return o.value; });
      if (targets.length) inst.target = targets.join(",");
      return call(modelPath(":explain"), { instances: [inst] });
    }).then(function (r) {
      S.busy = false;
      const ms = Math.round(performance.now() - t0);
      const preds = r.body && Array.isArray(r.body.predictions) ? r.body.predictions : null;
      const answer = preds && preds.length === 1 ? preds[0] : null;
      if (!answer || typeof answer !== "object" || typeof answer.code === "number" || (r.status !== 200 && !answer)) {
        showError(r.status, answer || r.body, f);
        return;
      }
      show(answer, f);
      setStatus("Explained " + f.name + " in " + ms + " ms.");
    }).catch(function (err) {
      S.busy = false;
      setStatus("The request failed: " + err.message, true);
    }).finally(checkTargets);
  }

  function showError(status, body, f) {
    $("side").replaceChildren();
    const p = h("section", "panel");
    p.append(h("h2", null, "Error"), h("p", "error", errorText(status, body)));
    $("side").append(p);
    setStatus("The predictor refused " + f.name + " (HTTP " + status + ").", true);
  }

  function pct(v) { return (100 * v).toFixed(3) + "%"; }

  /* A figure: an image with boxes ([x0, y0, x1, y1] in pixels of a w × h image) over it. */
  function figure(caption, url, boxes, size) {
    const fig = h("figure", "fig"), frame = h("div", "frame"), img = new Image();
    img.alt = caption;
    img.src = url;
    frame.append(img);
    for (const b of boxes || []) {
      if (!Array.isArray(b) || b.length !== 4 || !size || !(size[0] > 0 && size[1] > 0)) continue;
      const d = h("div", "box");
      d.style.left = pct(b[0] / size[0]);
      d.style.top = pct(b[1] / size[1]);
      d.style.width = pct(Math.max(0, b[2] - b[0]) / size[0]);
      d.style.height = pct(Math.max(0, b[3] - b[1]) / size[1]);
      frame.append(d);
    }
    fig.append(frame, h("figcaption", null, caption));
    return fig;
  }

  function png(b64) {
    return typeof b64 === "string" && /^[A-Za-z0-9+/]+={0,2}$/.test(b64) ? "data:image/png;base64," + b64 : null;
  }

  function table(title, head, rows) {
    const s = h("section", "panel");
    s.append(h("h2", null, title));
    const t = h("table", "table"), tr = h("tr");
    for (const c of head) tr.append(h("th", null, c));
    t.append(tr);
    for (const cells of rows) {
      const r = h("tr");
      for (const c of cells) r.append(h("td", null, c === undefined || c === null ? "–" : c));
      t.append(r);
    }
    s.append(t);
    return s;
  }

  function show(a, f) {
    const figs = [figure("uploaded: " + f.name, S.preview, null)];
    const exps = Array.isArray(a.explanations) ? a.explanations : [];
    for (const e of exps) {
      if (!e || typeof e !== "object") continue;
      const url = png(e.overlay) || png(e.heatmap);
      if (!url) continue;
      const cap = (e.label !== undefined ? e.label : "target") + (e.target !== undefined ? " (" + e.target + ")" : "") + " · " + fmt(e.score) + " · " + e.method;
      figs.push(figure(cap, url, e.bbox ? [e.bbox] : null, [e.width, e.height]));
    }
    $("figures").replaceChildren(...figs);
    const side = [];
    const ranked = Array.isArray(a.predictions) ? a.predictions : (Array.isArray(a.labels) ? a.labels : null);
    if (ranked) {
      side.push(table("Top " + ranked.length, ["label", "index", "score"], ranked.map(function (p) {
        return [p && p.label, p && p.index, fmt(p && p.score)];
      })));
    }
    if (exps.length) {
      side.push(table("Explained", ["label", "score", "method", "box"], exps.map(function (e) {
        return [e.label, fmt(e.score), e.method, Array.isArray(e.bbox) ? "[" + e.bbox.join(", ") + "]" : "–"];
      })));
    }
    const raw = h("details", "panel");
    raw.append(h("summary", null, "answer (overlays cut)"), h("pre", null, JSON.stringify(a, function (k, v) {
      return typeof v === "string" && v.length > 120 ? v.slice(0, 60) + "…" : v;
    }, 1)));
    side.push(raw);
    $("side").replaceChildren(...side);
  }

  init();
})();
