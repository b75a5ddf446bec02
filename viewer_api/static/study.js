// The study screen: patient header, series thumbnails, image viewer, report.

import { api } from "./api.js";
import { ReadingClaim } from "./claim.js";
import { Compare } from "./compare.js";
import { onLangChange, t } from "./i18n.js";
import { KeyImages } from "./keyimages.js";
import { ReportPanel } from "./report.js";
import { DoseSummary, isStructuredReport } from "./sr.js";
import { formatDate, formatPN, h, isTyping, listText, readSession, sexLabel, writeSession } from "./util.js";
import { NON_IMAGE, Viewer, isImage } from "./viewer.js";
import { priorityBadge } from "./worklist.js";


export function mountStudy(root, ctx, studyUid) {
  let study = null;
  let selected = null;
  let destroyed = false;

  const viewer = new Viewer(studyUid);
  // Key images: the toggle in the toolbar, a star by the frame counter, the selection saved at once.
  const keys = new KeyImages(studyUid, ctx.user, viewer);
  viewer.element.querySelector(".viewer-toolbar .spacer").before(keys.button);
  viewer.sliceLabel.after(keys.marker, keys.state, viewer.measure.state);
  keys.onChange = () => markKeys();
  // Where the reader was (series, slice, preset), so that a reload or coming
  // back from the worklist shows the same image; this tab only.
  const viewKey = `pacs.view.${studyUid}`;
  let restoring = false;
  viewer.onChange = () => {
    keys.refresh();
    if (restoring || !selected || viewer.index < 0) return;
    writeSession(viewKey, { series: selected.series_uid, index: viewer.index, preset: viewer.preset });
  };
  const report = new ReportPanel(studyUid, ctx.user);
  // A key image marked just before signing is in the signed PDF: the signature waits for its save.
  report.beforeSign = () => keys.settled();
  // Who is reading it: claimed on opening (a radiologist), kept while open, shown to colleagues.
  const claim = new ReadingClaim(studyUid, ctx.user);
  report.onStatus = (status) => {
    if (study) claim.reportStatus(status);
  };
  // The radiation dose of the study's dose reports (RDSR), above the report.
  const dose = new DoseSummary(studyUid);
  // An image a structured report refers to: this study's is shown here, another study's opens there.
  viewer.onOpenImage = (ref) => openImage(ref);
  const header = h("header#study-header.study-header", h("span.muted", { "data-i18n": "loading" }));
  const seriesList = h("nav#series-list.series-list", { "data-i18n-aria": "series" });
  const message = h("div#study-error.error", { role: "alert", hidden: true });
  const viewerCol = h("div.viewer-col", viewer.element);
  // Side by side with another study of the patient (compare.js); null: the single viewer.
  let compare = null;
  let others = []; // the patient's other studies this user may see, newest first
  // The series' slice positions read by a comparison, kept for the next one (compare.js).
  const geometry = { geometry: new Map(), known: new Map() };

  root.append(
    h(
      "section.study-screen",
      header,
      claim.element,
      message,
      h("div.study-body", seriesList, viewerCol, h("aside.report-col", dose.element, report.element)),
    ),
  );

  function item(labelKey, value, id) {
    if (!value) return null;
    return h("span.hitem", h("span.hlabel", { "data-i18n": labelKey }, t(labelKey)), " ", h(`span${id ? `#${id}` : ""}.hvalue`, value));
  }

  function renderHeader() {
    if (!study) return;
    const name = formatPN(study.patient_name);
    // item() is null for an empty value: replaceChildren() would show it as the text "null".
    header.replaceChildren(...[
      h("a#back-to-worklist.btn.small", { href: "#/worklist", "data-i18n": "back", "data-i18n-title": "back_title" }, t("back")),
      priorityBadge(study.priority),
      h("strong#patient-name.patient-name", { title: name }, name),
      item("patient_id", study.patient_id, "patient-id"),
      item("birth_date", [formatDate(study.birth_date), sexLabel(study.sex)].filter(Boolean).join(" · "), "patient-birth"),
      item("study_date", formatDate(study.study_date), "study-date"),
      item("accession", study.accession, "study-accession"),
      h("span.hitem.modalities", listText(study.modalities)),
      h("span#study-description.hitem.description", { title: study.description || "" }, study.description || ""),
      // Reading it oneself (or "Claim"): a colleague's claim is the banner below.
      claim.chip,
      // The study as a DICOM CD/USB file-set (a zip: DICOMDIR, README.TXT, DICOM/...) for the patient to
      // take to another hospital; the session cookie authorises the download, the server audits it.
      h("a#study-media.btn.small.media-download", {
        href: `/api/studies/${encodeURIComponent(studyUid)}/media`,
        download: "",
        "data-i18n": "media_download",
        "data-i18n-title": "media_download_title",
        title: t("media_download_title"),
      }, t("media_download")),
    ].filter(Boolean));
    header.querySelector("#back-to-worklist").title = t("back_title");
    document.title = `${name} – ${t("app_title")}`;
  }

  function thumbnail(series) {
    const s = encodeURIComponent;
    // Documents and structured objects have no picture to ask for (a 4xx per series).
    const img = NON_IMAGE.has(series.modality) || series.has_pixels === false ? h("div.thumb-missing", series.modality || "?") : h("img", {
      src: `/dicom-web/studies/${s(studyUid)}/series/${s(series.series_uid)}/thumbnail`,
      alt: "",
      loading: "lazy",
      decoding: "async",
      width: "96",
      height: "96",
    });
    if (img.tagName === "IMG") img.addEventListener("error", () => img.replaceWith(h("div.thumb-missing", series.modality || "?")));
    const count = series.num_instances ?? (series.instances || []).length;
    const button = h(
      "button.series-thumb",
      {
        type: "button",
        "data-testid": "series-thumb",
        dataset: { seriesUid: series.series_uid, modality: series.modality || "" },
        title: series.description || "",
        onclick: () => select(series),
      },
      img,
      h("span.thumb-line", h("b", series.modality || ""), series.series_number != null ? ` #${series.series_number}` : ""),
      h("span.thumb-desc", series.description || ""),
      h("span.thumb-count", t("images_count", { n: count }), h("span.thumb-key", { hidden: true })),
    );
    return button;
  }

  function renderSeries() {
    seriesList.replaceChildren(...(study.series || []).map(thumbnail), priors);
    markSelected();
    markKeys();
  }

  /** A star and the count on the thumbnail of each series holding key images. */
  function markKeys() {
    for (const el of seriesList.querySelectorAll(".series-thumb")) {
      const n = keys.countIn(el.dataset.seriesUid);
      const star = el.querySelector(".thumb-key");
      if (!star) continue;
      star.hidden = !n;
      star.textContent = n ? ` ★ ${n}` : "";
      star.title = n ? t("key_images_count", { n }) : "";
      el.classList.toggle("has-key", n > 0);
    }
  }

  // The patient's other studies (priors and later ones) for comparison, as far
  // as this user may see them (the priors API applies the worklist's access rule).
  const priors = h("div#prior-studies.priors", { hidden: true });
  async function loadPriors() {
    if (!study || !study.patient_id) return;
    try {
      // By the server's patient, not the Patient ID: another issuer's patient may have the same one.
      const data = await api("GET", `/api/studies/${encodeURIComponent(studyUid)}/priors`, { query: { limit: 20 } });
      const items = ((data && data.items) || []).filter((i) => i.study_uid !== studyUid);
      if (destroyed || !items.length) return;
      others = items;
      renderPriors();
    } catch {
      /* comparison is a convenience: the study itself is shown */
    }
  }

  function renderPriors() {
    if (!others.length) return;
    priors.replaceChildren(
      h("div.priors-title", { "data-i18n": "other_studies" }, t("other_studies")),
      // Each one opens in place of this study, or beside it ("So sánh").
      ...others.map((i) => h("div.prior-item", { dataset: { studyUid: i.study_uid } },
        h("a.prior-study", {
          href: `#/study/${encodeURIComponent(i.study_uid)}`, "data-testid": "prior-study", title: i.description || "",
        }, h("b", formatDate(i.study_date)), ` ${listText(i.modalities)}`, h("span.thumb-desc", i.description || "")),
        h("button.btn.small.prior-compare", {
          type: "button", "data-testid": "prior-compare", dataset: { studyUid: i.study_uid },
          "aria-pressed": String(Boolean(compare && compare.otherUid === i.study_uid)),
          title: t("compare_title"), onclick: () => openCompare(i.study_uid),
        }, t("compare")))),
    );
    priors.hidden = false;
  }

  /** Show study *uid* beside this one (again: nothing changes). */
  function openCompare(uid) {
    if (!study || (compare && compare.otherUid === uid)) return;
    if (compare) compare.destroy();
    compare = new Compare(viewer, study, uid, () => closeCompare(), geometry);
    viewerCol.replaceChildren(compare.element);
    compare.load();
    renderPriors();
    viewer.viewport.focus({ preventScroll: true });
  }

  /** Back to the single viewer, as it was (series, slice, window, zoom). */
  function closeCompare() {
    if (!compare) return;
    compare.destroy();
    compare = null;
    viewerCol.replaceChildren(viewer.element);
    renderPriors();
    viewer.viewport.focus({ preventScroll: true });
  }

  /** S: compare with the newest earlier study (or the first other one); S again closes the comparison. */
  function toggleCompare() {
    if (compare) {
      closeCompare();
      return;
    }
    const date = String((study && study.study_date) || "");
    // A study of documents only (a scanned form, a report SR, KO, PR) has nothing to compare with: skipped.
    const imaging = (i) => {
      const modalities = listText(i.modalities).split(", ").filter(Boolean); // "CT\\SR" or a list
      return !modalities.length || modalities.some((m) => !NON_IMAGE.has(m));
    };
    const images = others.filter(imaging);
    const earlier = images.find((i) => String(i.study_date || "") <= date) || images[0];
    if (earlier) openCompare(earlier.study_uid);
  }

  function markSelected() {
    for (const el of seriesList.querySelectorAll(".series-thumb")) {
      const active = selected && el.dataset.seriesUid === selected.series_uid;
      el.classList.toggle("active", Boolean(active));
      el.setAttribute("aria-current", active ? "true" : "false");
    }
  }

  function select(series) {
    // While comparing, a series of this study chosen makes its side the one the keys go to.
    if (compare) compare.setActive(viewer);
    // A presentation state series (saved measurements) has no picture: its entry opens the image it draws on.
    const drawn = series && series.modality === "PR" ? viewer.measure.firstImageOf(series.series_uid) : null;
    const target = drawn && (study.series || []).find((s) => s.series_uid === drawn.series_uid);
    if (target) {
      showInstance(target, drawn.sop_uid, drawn.frame);
      return;
    }
    if (!series || series === selected) return;
    selected = series;
    markSelected();
    viewer.setSeries(series);
  }

  /** Show the slice of instance ref.sop_uid (frame ref.frame) of series ref.series_uid. */
  function showInstance(series, sop, frame) {
    select(series);
    const i = viewer.slices.findIndex((s) => s.sop === sop && (!frame || !s.frame || s.frame === frame));
    if (i >= 0) viewer.go(i);
    viewer.viewport.focus({ preventScroll: true });
  }

  function openImage(ref) {
    if (ref.study_uid !== studyUid) {
      // The other study opens on that image (its screen restores what is kept for it).
      writeSession(`pacs.view.${ref.study_uid}`, { series: ref.series_uid, sop: ref.sop_uid, frame: ref.frame || null });
      ctx.navigate(`#/study/${encodeURIComponent(ref.study_uid)}`);
      return;
    }
    const series = ((study && study.series) || []).find((s) => s.series_uid === ref.series_uid);
    if (series) showInstance(series, ref.sop_uid, ref.frame);
  }

  function stepSeries(delta) {
    // Presentation state series are stepped over: each opens an image series of the list.
    const all = (study && study.series ? study.series : []).filter((s) => s.modality !== "PR" || s === selected);
    if (!all.length) return;
    const i = all.indexOf(selected);
    const next = all[Math.max(0, Math.min(all.length - 1, i + delta))];
    select(next);
    const el = seriesList.querySelector(`[data-series-uid="${CSS.escape(next.series_uid)}"]`);
    if (el) el.scrollIntoView({ block: "nearest" });
  }

  function onKey(event) {
    if (event.defaultPrevented || isTyping(event) || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "Escape") {
      event.preventDefault();
      // While comparing, Escape closes the comparison (as its button): leaving the study would drop the
      // reading in progress (its claim, the report being read beside it).
      if (compare) closeCompare();
      else ctx.navigate("#/worklist");
    } else if ((event.key === "ArrowLeft" || event.key === "ArrowRight") && !/slice-slider$/.test(event.target.id)) {
      event.preventDefault();
      const delta = event.key === "ArrowLeft" ? -1 : 1;
      // While comparing, the active viewport's study steps: the prior's series in its own selector.
      if (compare && compare.prior.active) compare.stepSeries(delta);
      else stepSeries(delta);
    } else if ((event.key === "s" || event.key === "S") && !event.repeat && !event.shiftKey) {
      event.preventDefault();
      toggleCompare();
    }
  }
  document.addEventListener("keydown", onKey);
  const offLang = onLangChange(() => {
    renderHeader();
    if (study) renderSeries();
    renderPriors();
    dose.render();
  });

  /** The study's series again (a save made a measurements series, removed one): the list redrawn. */
  async function refreshSeries() {
    let fresh;
    try {
      fresh = await api("GET", `/api/studies/${encodeURIComponent(studyUid)}`);
    } catch {
      return; // the list is a convenience: the next opening shows it
    }
    if (destroyed || !study || !fresh) return;
    // The series objects the viewer holds stay (the one shown keeps its place); new ones added, gone ones removed.
    const known = new Map((study.series || []).map((s) => [s.series_uid, s]));
    study.series = (fresh.series || []).map((s) => known.get(s.series_uid) || s);
    renderSeries();
  }

  async function load() {
    try {
      study = await api("GET", `/api/studies/${encodeURIComponent(studyUid)}`);
    } catch (exc) {
      if (destroyed || exc.status === 401) return;
      header.replaceChildren(h("a#back-to-worklist.btn.small", { href: "#/worklist", "data-i18n": "back" }, t("back")));
      message.textContent = exc.message;
      message.hidden = false;
      return;
    }
    if (destroyed) return;
    renderHeader();
    renderSeries();
    keys.load();
    // The saved measurements (presentation states): one's own editable, the others' drawn read-only.
    viewer.measure.load(ctx.user);
    viewer.measure.onSaved = () => refreshSeries();
    claim.start(study);
    const all = study.series || [];
    // The examination's modality and body part (its first image series, not a report PDF): their templates first.
    const examined = all.find((s) => s.modality && !NON_IMAGE.has(s.modality)) || {};
    report.setStudy(examined.modality || "", examined.body_part || "");
    const saved = readSession(viewKey);
    const before = saved && all.find((s) => s.series_uid === saved.series);
    const first = before || all.find((s) => !NON_IMAGE.has(s.modality) && (s.instances || []).some(isImage)) || all[0];
    restoring = Boolean(before);
    if (first) select(first);
    if (before) {
      if (saved.preset && saved.preset !== "default" && saved.preset !== "custom") viewer.applyPreset(saved.preset);
      // An image a report of another study referred to is kept by its instance (its index was not known).
      const at = saved.sop
        ? viewer.slices.findIndex((s) => s.sop === saved.sop && (!saved.frame || !s.frame || s.frame === saved.frame))
        : -1;
      viewer.go(at >= 0 ? at : Number(saved.index) || 0);
    }
    restoring = false;
    viewer.viewport.focus({ preventScroll: true });
    loadPriors();
    // Only a study with a structured report may hold a dose report: no request (nor audit event) otherwise.
    if (all.some((s) => (s.instances || []).some(isStructuredReport))) dose.load();
  }

  load();
  report.load();

  return {
    canLeave: () => !report.dirty,
    // The user chose to leave without saving: the kept copy goes too.
    discard: () => report.dropUnsaved(),
    cleanup() {
      destroyed = true;
      document.removeEventListener("keydown", onKey);
      if (compare) compare.destroy();
      offLang();
      viewer.destroy();
      keys.destroy();
      claim.destroy();
      report.destroy();
      document.title = t("app_title");
    },
  };
}
