// The patient's page of a share link (viewer_api/share_page.py): a study's
// images and signed report on a phone, without an account. A link made for
// an order before the scan (the receipt printed at registration) says the
// images are not ready yet until a study is linked to the order, then shows
// it as a study link does (every study of the order, when there are several).
// Everything it shows comes from the link's own routes (/share/{token}/...).
// No inline script or style anywhere: the page runs under the app's
// Content-Security-Policy (style values are set through CSSOM).

const LABELS = {
  vi: {
    title: "Kết quả chụp chiếu",
    loading: "Đang tải…",
    lang_toggle: "EN",
    lang_title: "Switch to English",
    birth_title: "Xác nhận người bệnh",
    birth_text: "Để bảo vệ thông tin của người bệnh, vui lòng nhập năm sinh của người bệnh.",
    birth_label: "Năm sinh (4 chữ số)",
    birth_submit: "Xem kết quả",
    birth_wrong: "Năm sinh không đúng. Còn {n} lần thử.",
    birth_locked: "Nhập sai quá nhiều lần. Vui lòng thử lại sau {time}.",
    birth_invalid: "Vui lòng nhập đủ 4 chữ số, ví dụ 1975.",
    study_date: "Ngày chụp",
    modality: "Loại chụp",
    description: "Nội dung",
    report: "Kết quả đọc",
    findings: "Mô tả",
    impression: "Kết luận",
    signed_by: "Bác sĩ đọc kết quả",
    signed_at: "Ký lúc",
    pdf: "Tải kết quả (PDF)",
    no_report: "Chưa có kết quả đọc.",
    images: "Hình ảnh",
    key_images: "Ảnh chính",
    key_hint: "Những ảnh bác sĩ đã chọn để bạn xem trước.",
    key_n: "Ảnh chính {n}",
    no_images: "Ca chụp này không có hình ảnh để xem.",
    n_images: "{n} ảnh",
    close: "Đóng",
    prev: "Ảnh trước",
    next: "Ảnh sau",
    image_failed: "Không hiển thị được ảnh này.",
    error: "Không tải được kết quả. Vui lòng thử lại sau.",
    gone: "Liên kết không còn hiệu lực. Vui lòng liên hệ bệnh viện.",
    expires: "Liên kết có hiệu lực đến {date}.",
    hint: "Vuốt lên/xuống hoặc kéo thanh trượt để xem từng ảnh.",
    scheduled: "Ngày hẹn chụp",
    not_ready_title: "Hình ảnh của bạn chưa sẵn sàng",
    not_ready_text: "Hình ảnh và kết quả sẽ hiển thị tại đây sau khi chụp xong. Vui lòng quay lại sau.",
    check_again: "Kiểm tra lại",
    n_studies: "Chỉ định này có {n} ca chụp, hiển thị bên dưới.",
    study_n: "Ca chụp {n}",
    cancelled: "Ca chụp đã bị hủy. Vui lòng liên hệ bệnh viện nếu bạn có thắc mắc.",
  },
  en: {
    title: "Imaging results",
    loading: "Loading…",
    lang_toggle: "VI",
    lang_title: "Chuyển sang tiếng Việt",
    birth_title: "Confirm the patient",
    birth_text: "To protect the patient's information, please enter the patient's year of birth.",
    birth_label: "Year of birth (4 digits)",
    birth_submit: "See the results",
    birth_wrong: "That year of birth is not right. {n} tries left.",
    birth_locked: "Too many wrong answers. Please try again after {time}.",
    birth_invalid: "Please enter 4 digits, e.g. 1975.",
    study_date: "Date",
    modality: "Modality",
    description: "Examination",
    report: "Report",
    findings: "Findings",
    impression: "Impression",
    signed_by: "Reported by",
    signed_at: "Signed",
    pdf: "Download the report (PDF)",
    no_report: "No report yet.",
    images: "Images",
    key_images: "Key images",
    key_hint: "The images your doctor chose for you to see first.",
    key_n: "Key image {n}",
    no_images: "This study has no images to show.",
    n_images: "{n} images",
    close: "Close",
    prev: "Previous image",
    next: "Next image",
    image_failed: "This image cannot be shown.",
    error: "The results could not be loaded. Please try again later.",
    gone: "This link no longer works. Please contact the hospital.",
    expires: "This link works until {date}.",
    hint: "Swipe up/down or drag the slider to go through the images.",
    scheduled: "Scheduled for",
    not_ready_title: "Your images are not ready yet",
    not_ready_text: "The images and the report will appear here once the examination is done. Please come back later.",
    check_again: "Check again",
    n_studies: "This order has {n} examinations, shown below.",
    study_n: "Examination {n}",
    cancelled: "The examination was cancelled. Please contact the hospital if you have questions.",
  },
};

const LANG_KEY = "pacs.lang";
// Pixels of drag per image when scrolling through a series.
const DRAG_STEP = 18;
// Images fetched ahead of the one shown, each way.
const PRELOAD = 3;

const token = decodeURIComponent(location.pathname.split("/")[2] || "");
const base = `/share/${encodeURIComponent(token)}`;
const main = document.getElementById("share-main");
let lang = storedLang();
let view = { kind: "loading" };

function storedLang() {
  try {
    const value = localStorage.getItem(LANG_KEY);
    if (value === "vi" || value === "en") return value;
  } catch (_) { /* storage off: the default */ }
  return "vi";
}

function t(key, params = {}) {
  const text = (LABELS[lang] && LABELS[lang][key]) || LABELS.vi[key] || key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(params[name] ?? ""));
}

/** h("tag#id.cls", {attrs}, ...children): a DOM element (no innerHTML: names are data). */
function h(spec, attrs, ...children) {
  const m = /^([a-z0-9]+)?(?:#([\w-]+))?((?:\.[\w-]+)*)$/i.exec(spec);
  const el = document.createElement((m && m[1]) || "div");
  if (m && m[2]) el.id = m[2];
  if (m && m[3]) el.className = m[3].slice(1).split(".").join(" ");
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** DICOM PN "Nguyễn^Văn An" -> "Nguyễn Văn An". */
function formatPN(pn) {
  const [family = "", given = "", middle = "", prefix = "", suffix = ""] = String(pn || "").split("=")[0].split("^");
  return [prefix, family, given, middle, suffix].map((s) => s.trim()).filter(Boolean).join(" ");
}

/** DICOM DA and TM "20240131", "0930" -> "31/01/2024 09:30" (vi) or "2024-01-31 09:30" (en). */
function formatDateAndTime(da, tm) {
  const m = /^(\d{2})(\d{2})/.exec(String(tm || ""));
  return [formatDate(da), m ? `${m[1]}:${m[2]}` : ""].filter(Boolean).join(" ");
}

/** DICOM DA "20240131" -> "31/01/2024" (vi) or "2024-01-31" (en). */
function formatDate(da) {
  const m = /^(\d{4})-?(\d{2})-?(\d{2})/.exec(String(da || ""));
  if (!m) return da || "";
  return lang === "vi" ? `${m[3]}/${m[2]}/${m[1]}` : `${m[1]}-${m[2]}-${m[3]}`;
}

/** When a lock ends: the time alone today, with the date on another day
 * (a lock lasts up to a day: "after 14:30" alone read as now). */
function formatUntil(iso) {
  const d = new Date(iso);
  return formatDateTime(iso, !Number.isNaN(d.getTime()) && d.toDateString() === new Date().toDateString());
}

function formatDateTime(iso, timeOnly = false) {
  const d = new Date(iso);
  if (!iso || Number.isNaN(d.getTime())) return iso || "";
  const options = timeOnly ? { hour: "2-digit", minute: "2-digit" }
    : { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit" };
  return d.toLocaleString(lang === "vi" ? "vi-VN" : "en-GB", options);
}

// -- language -----------------------------------------------------------------------
function applyLang() {
  document.documentElement.lang = lang;
  document.title = t("title");
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  const toggle = document.getElementById("lang-toggle");
  toggle.textContent = t("lang_toggle");
  toggle.title = t("lang_title");
}

document.getElementById("lang-toggle").addEventListener("click", () => {
  lang = lang === "vi" ? "en" : "vi";
  try { localStorage.setItem(LANG_KEY, lang); } catch (_) { /* not kept */ }
  applyLang();
  render();
});

// -- loading ------------------------------------------------------------------------
async function load() {
  let response;
  try {
    response = await fetch(`${base}/study`, { credentials: "same-origin", cache: "no-store" });
  } catch (_) {
    view = { kind: "message", key: "error" };
    return render();
  }
  const body = await response.json().catch(() => ({}));
  if (response.ok) view = body.kind === "order" ? { kind: "order", order: body } : { kind: "study", study: body };
  else if (response.status === 403 && body.birth_year_required) {
    const locked = body.locked_until ? t("birth_locked", { time: formatUntil(body.locked_until) }) : "";
    view = { kind: "birth", message: locked };
  } else if (response.status === 410 && /cancelled/.test(body.error || "")) {
    view = { kind: "message", key: "cancelled" };
  } else view = { kind: "message", key: response.status === 404 || response.status === 410 ? "gone" : "error" };
  render();
}

function render() {
  applyLang();
  if (view.kind === "study") main.replaceChildren(...studyView(view.study));
  else if (view.kind === "order") main.replaceChildren(...orderView(view.order));
  else if (view.kind === "birth") main.replaceChildren(birthView());
  else if (view.kind === "message") main.replaceChildren(h("p.share-message#share-message", t(view.key)));
  else main.replaceChildren(h("p.share-muted", t("loading")));
}

// -- the birth year -----------------------------------------------------------------
function birthView() {
  const input = h("input#birth-year.share-input", {
    type: "text", inputmode: "numeric", pattern: "[0-9]{4}", maxlength: "4", autocomplete: "off",
    required: true, "aria-describedby": "birth-message",
  });
  const message = h("p#birth-message.share-error", { role: "alert" }, view.message || "");
  const form = h("form#birth-form.share-card", { novalidate: true },
    h("h1", t("birth_title")),
    h("p", t("birth_text")),
    h("label", { for: "birth-year" }, t("birth_label")),
    input,
    h("button#birth-submit.share-button", { type: "submit" }, t("birth_submit")),
    message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const year = input.value.trim();
    if (!/^\d{4}$/.test(year)) {
      message.textContent = t("birth_invalid");
      return;
    }
    let response;
    try {
      response = await fetch(`${base}/birth-year`, {
        method: "POST", credentials: "same-origin", cache: "no-store",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify({ birth_year: year }),
      });
    } catch (_) {
      message.textContent = t("error");
      return;
    }
    if (response.status === 204) return load();
    const body = await response.json().catch(() => ({}));
    if (response.status === 429) view.message = t("birth_locked", { time: formatUntil(body.locked_until) });
    else if (response.status === 403) view.message = t("birth_wrong", { n: body.tries_left });
    else if (response.status === 400) view.message = t("birth_invalid");
    else view.message = t(response.status === 404 || response.status === 410 ? "gone" : "error");
    message.textContent = view.message;
    input.select();
  });
  queueMicrotask(() => input.focus());
  return form;
}

// -- the study ----------------------------------------------------------------------
function studyFacts(study, sfx = "") {
  return h("dl.share-facts",
    h("dt", t("study_date")), h(`dd#study-date${sfx}`, formatDate(study.study_date)),
    study.modalities ? [h("dt", t("modality")), h(`dd#study-modality${sfx}`, study.modalities)] : null,
    study.description ? [h("dt", t("description")), h(`dd#study-description${sfx}`, study.description)] : null);
}

function expiresView(expiresAt) {
  return h("p.share-muted.share-expires", t("expires", { date: formatDateTime(expiresAt) }));
}

/** One study, as a study link shows it (an order's only study too). */
function studyView(study, pdf = `${base}/report.pdf`) {
  const header = h("section.share-card.share-patient",
    h("h1#patient-name", formatPN(study.patient_name)), studyFacts(study));
  return [header, keyImagesView(study.key_images), reportView(study.report, pdf), seriesView(study.series),
    expiresView(study.expires_at)].filter(Boolean);
}

function studyPdf(study) {
  return `${base}/studies/${encodeURIComponent(study.study_uid)}/report.pdf`;
}

// -- an order: not ready yet, its study, or its studies -----------------------------
function orderView(data) {
  const studies = data.studies || [];
  if (studies.length === 1) {
    return studyView({ ...studies[0], patient_name: data.patient_name, expires_at: data.expires_at },
      studyPdf(studies[0]));
  }
  const order = data.order || {};
  const header = h("section.share-card.share-patient", h("h1#patient-name", formatPN(data.patient_name)));
  if (!studies.length) {
    header.append(h("dl.share-facts",
      h("dt", t("scheduled")), h("dd#order-date", formatDateAndTime(order.date, order.time)),
      order.modalities ? [h("dt", t("modality")), h("dd#order-modality", order.modalities)] : null,
      order.procedure ? [h("dt", t("description")), h("dd#order-procedure", order.procedure)] : null));
    const waiting = h("section#not-ready.share-card",
      h("h2#not-ready-title", t("not_ready_title")),
      h("p.share-text", t("not_ready_text")),
      h("button#check-again.share-button", { type: "button", onclick: () => load() }, t("check_again")));
    return [header, waiting, expiresView(data.expires_at)];
  }
  header.append(h("p#order-studies.share-muted", t("n_studies", { n: studies.length })));
  const sections = studies.map((study, i) => {
    const sfx = `-${i + 1}`;
    return h(`section#study${sfx}.share-study`, { "data-study": study.study_uid },
      h("section.share-card", h("h2", t("study_n", { n: i + 1 })), studyFacts(study, sfx)),
      keyImagesView(study.key_images, sfx), reportView(study.report, studyPdf(study), sfx),
      seriesView(study.series, sfx));
  });
  return [header, ...sections, expiresView(data.expires_at)];
}

function reportView(report, pdf, sfx = "") {
  const section = h(`section#report${sfx}.share-card.share-report`, h("h2", t("report")));
  if (!report || report.status !== "signed") {
    section.append(h(`p#no-report${sfx}.share-muted`, t("no_report")));
    return section;
  }
  if (report.findings) section.append(h("h3", t("findings")), h(`p#report-findings${sfx}.share-text`, report.findings));
  if (report.impression) {
    section.append(h("h3", t("impression")),
      h(`p#report-impression${sfx}.share-text.share-impression`, report.impression));
  }
  section.append(
    h(`p#report-signed${sfx}.share-muted`,
      `${t("signed_by")}: ${report.signed_by || ""} · ${t("signed_at")}: ${formatDateTime(report.signed_at)}`));
  // No PDF when the signed one names the patient the study was filed under before (the server says so).
  if (report.pdf !== false) {
    section.append(h(`a#report-pdf${sfx}.share-button`, { href: pdf, target: "_blank", rel: "noopener" }, t("pdf")));
  }
  return section;
}

function seriesView(series, sfx = "") {
  const section = h(`section#images${sfx}.share-card`, h("h2", t("images")));
  if (!series.length) {
    section.append(h("p.share-muted", t("no_images")));
    return section;
  }
  const grid = h("div.share-grid");
  for (const s of series) {
    const count = s.images.reduce((n, image) => n + (image.frames || 1), 0);
    const label = [s.description || s.modality, t("n_images", { n: count })].filter(Boolean).join(" · ");
    const thumb = h("img.share-thumb", {
      src: `${base}/series/${encodeURIComponent(s.series_uid)}/thumbnail`, alt: label, loading: "lazy",
    });
    thumb.addEventListener("error", () => thumb.classList.add("share-broken"));
    grid.append(h("button.share-series", {
      type: "button", "data-series": s.series_uid, onclick: () => openViewer(s, label),
    }, thumb, h("span.share-series-label", label)));
  }
  section.append(grid, h("p.share-muted", t("hint")));
  return section;
}

/** The images the radiologist marked as key images, first: each opens at
 * its own frame, and the viewer goes through them alone. */
function keyImagesView(keys, sfx = "") {
  if (!keys || !keys.length) return null;
  const frames = keys.map((k) => ({ series: k.series_uid, sop: k.sop_uid, n: k.frame || 1 }));
  const grid = h("div.share-grid.share-key-grid");
  frames.forEach((frame, i) => {
    const label = t("key_n", { n: i + 1 });
    const thumb = h("img.share-thumb", { src: frameUrl(frame), alt: label, loading: "lazy" });
    thumb.addEventListener("error", () => thumb.classList.add("share-broken"));
    grid.append(h("button.share-series.share-key", {
      type: "button", "data-sop": frame.sop, "data-frame": String(frame.n),
      onclick: () => openFrames(frames, t("key_images"), i),
    }, thumb, h("span.share-series-label", `★ ${label}`)));
  });
  return h(`section#key-images${sfx}.share-card.share-keys`, h("h2", t("key_images")),
    h("p.share-muted", t("key_hint")), grid);
}

// -- the image viewer -----------------------------------------------------------------
let viewer = null;

function frameUrl(frame) {
  const series = encodeURIComponent(frame.series);
  return `${base}/series/${series}/instances/${encodeURIComponent(frame.sop)}/frames/${frame.n}`;
}

function openViewer(series, label) {
  const frames = [];
  for (const image of series.images) {
    for (let n = 1; n <= (image.frames || 1); n++) frames.push({ series: series.series_uid, sop: image.sop_uid, n });
  }
  openFrames(frames, label, 0);
}

/** The full-screen viewer over *frames*, at frames[start]. */
function openFrames(frames, label, start) {
  const img = h("img#frame-image.share-frame", { alt: label, draggable: "false" });
  const failed = h("p#frame-failed.share-frame-failed", { hidden: true }, t("image_failed"));
  const counter = h("span#frame-counter.share-counter");
  const slider = h("input#frame-slider.share-slider", {
    type: "range", min: "1", max: String(frames.length), value: "1", "aria-label": label,
  });
  const stage = h("div#frame-stage.share-stage", img, failed);
  const panel = h("div#viewer.share-viewer", { role: "dialog", "aria-modal": "true", "aria-label": label },
    h("div.share-viewer-top",
      h("span.share-viewer-title", label), counter,
      h("button#viewer-close.share-icon", { type: "button", "aria-label": t("close"), title: t("close"),
        onclick: () => closeViewer(true) }, "✕")),
    stage,
    h("div.share-viewer-bottom",
      h("button#frame-prev.share-icon", { type: "button", "aria-label": t("prev"), onclick: () => step(-1) }, "‹"),
      slider,
      h("button#frame-next.share-icon", { type: "button", "aria-label": t("next"), onclick: () => step(1) }, "›")));
  viewer = { frames, index: 0, img, failed, counter, slider, panel, stage, preloaded: new Map() };
  img.addEventListener("error", () => { failed.hidden = false; img.classList.add("share-broken"); });
  img.addEventListener("load", () => { failed.hidden = true; img.classList.remove("share-broken"); });
  slider.addEventListener("input", () => show(Number(slider.value) - 1));
  stage.addEventListener("wheel", (event) => { event.preventDefault(); step(event.deltaY > 0 ? 1 : -1); },
    { passive: false });
  dragToScroll(stage);
  document.addEventListener("keydown", onKey);
  document.body.append(panel);
  document.body.classList.add("share-viewing");
  history.pushState({ shareViewer: true }, "");
  show(start);
}

function closeViewer(fromButton) {
  if (!viewer) return;
  document.removeEventListener("keydown", onKey);
  viewer.panel.remove();
  viewer = null;
  document.body.classList.remove("share-viewing");
  if (fromButton && history.state && history.state.shareViewer) history.back();
}

// The phone's back button closes the viewer, not the page.
window.addEventListener("popstate", () => closeViewer(false));

function onKey(event) {
  if (event.key === "Escape") closeViewer(true);
  else if (event.key === "ArrowRight" || event.key === "ArrowDown" || event.key === "PageDown") step(1);
  else if (event.key === "ArrowLeft" || event.key === "ArrowUp" || event.key === "PageUp") step(-1);
  else return;
  event.preventDefault();
}

function step(delta) {
  if (viewer) show(viewer.index + delta);
}

function show(index) {
  const v = viewer;
  if (!v) return;
  v.index = Math.max(0, Math.min(v.frames.length - 1, index));
  v.img.src = frameUrl(v.frames[v.index]);
  v.counter.textContent = `${v.index + 1} / ${v.frames.length}`;
  v.slider.value = String(v.index + 1);
  // The next and previous few are fetched meanwhile: scrolling shows them at once.
  for (let d = 1; d <= PRELOAD; d++) {
    for (const i of [v.index + d, v.index - d]) {
      if (i < 0 || i >= v.frames.length) continue;
      const url = frameUrl(v.frames[i]);
      if (!v.preloaded.has(url)) {
        const image = new Image();
        image.src = url;
        v.preloaded.set(url, image);
      }
    }
  }
  while (v.preloaded.size > 40) v.preloaded.delete(v.preloaded.keys().next().value);
}

/** One finger dragged over the image goes through the series (as a radiologist scrolls a stack). */
function dragToScroll(stage) {
  let start = null;
  stage.addEventListener("pointerdown", (event) => {
    if (event.isPrimary) start = { x: event.clientX, y: event.clientY, index: viewer ? viewer.index : 0 };
  });
  stage.addEventListener("pointermove", (event) => {
    if (!start || !event.isPrimary || !viewer) return;
    const dx = start.x - event.clientX;
    const dy = start.y - event.clientY;
    const along = Math.abs(dy) >= Math.abs(dx) ? dy : dx;
    const target = start.index + Math.trunc(along / DRAG_STEP);
    if (target !== viewer.index) show(target);
  });
  for (const type of ["pointerup", "pointercancel", "pointerleave"]) {
    stage.addEventListener(type, () => { start = null; });
  }
}

applyLang();
load();
