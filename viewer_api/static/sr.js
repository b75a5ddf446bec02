// Structured reports (SR, RDSR, Key Object Selection, measurement reports):
// the content tree the server reads (/api/instances/{sop}/sr) shown as a
// document (headings for containers, "concept: value unit" rows, image
// references as links that open the image), and a study's radiation dose
// summary (/api/studies/{uid}/dose). Every value is text (textContent):
// nothing a modality wrote becomes markup.

import { api } from "./api.js";
import { t } from "./i18n.js";
import { formatDate, formatPN, h } from "./util.js";

const SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88.";
// SR documents of other families (Spectacle Prescription, Macular Grid Thickness).
const SR_OTHERS = new Set(["1.2.840.10008.5.1.4.1.1.78.6", "1.2.840.10008.5.1.4.1.1.79.1"]);
// Documents of one series shown at most (a series holds one or two).
const MAX_DOCUMENTS = 20;
const RELATIONSHIPS = {
  "HAS OBS CONTEXT": "sr_rel_obs",
  "HAS ACQ CONTEXT": "sr_rel_acq",
  "HAS CONCEPT MOD": "sr_rel_mod",
  "HAS PROPERTIES": "sr_rel_prop",
  "INFERRED FROM": "sr_rel_inferred",
  "SELECTED FROM": "sr_rel_selected",
};

/** Whether an instance of /api/studies is a structured report (by its SOP class). */
export function isStructuredReport(inst) {
  const sopClass = String((inst && inst.sop_class_uid) || "");
  return sopClass.startsWith(SR_PREFIX) || SR_OTHERS.has(sopClass);
}

/** A UCUM unit for reading: "mGy.cm" -> "mGy·cm", "Gy.m2" -> "Gy·m²". */
export function unitText(unit) {
  return String(unit || "").replace(/\./g, "·").replace(/(\D)2\b/g, "$1²").replace(/(\D)3\b/g, "$1³");
}

/** A measured figure for reading: 4 significant digits (a DAP of 0.00355 Gy·m² is not 0), a tenth above 1000. */
function number(value) {
  const n = Number(value);
  if (value === null || value === undefined || !Number.isFinite(n)) return "";
  return Math.abs(n) >= 1000 ? String(Math.round(n * 10) / 10) : String(Number(n.toPrecision(4)));
}

/** A DICOM DT / DA / TM value for reading. */
function dateTimeText(valueType, value) {
  const text = String(value || "");
  const time = (tm) => {
    const m = /^(\d{2})(\d{2})?(\d{2})?/.exec(tm);
    return m ? [m[1], m[2], m[3]].filter(Boolean).join(":") : tm;
  };
  if (valueType === "DATE") return formatDate(text);
  if (valueType === "TIME") return time(text);
  return [formatDate(text.slice(0, 8)), text.length > 8 ? time(text.slice(8)) : ""].filter(Boolean).join(" ");
}

function codeText(code) {
  return code ? code.meaning || code.value || "" : "";
}

function codeTitle(code) {
  return code ? `${code.value} (${code.scheme})` : "";
}

/**
 * The documents of an SR series, in the viewer's viewport. onOpenImage({study_uid, series_uid, sop_uid, frame})
 * opens a referenced image.
 */
export class StructuredReportView {
  constructor(onOpenImage) {
    this.onOpenImage = onOpenImage;
    this.element = h("div#sr-documents.sr-documents", { tabindex: "0" });
    this.generation = 0;
  }

  async show(instances) {
    this.generation += 1;
    const generation = this.generation;
    const shown = instances.slice(0, MAX_DOCUMENTS);
    this.element.replaceChildren(h("p.muted", t("sr_loading")));
    const articles = await Promise.all(shown.map(async (inst) => {
      try {
        return this.documentElement(await api("GET", `/api/instances/${encodeURIComponent(inst.sop_uid)}/sr`));
      } catch (exc) {
        return h("article.sr-document.sr-failed", { dataset: { sopUid: inst.sop_uid } },
          h("p.error", `${t("sr_error")}: ${exc.message}`));
      }
    }));
    if (generation !== this.generation) return;
    this.element.replaceChildren(...articles);
  }

  documentElement(doc) {
    const title = codeText(doc.title) || t("sr_untitled");
    const badges = [];
    if (doc.completion) {
      const complete = doc.completion === "COMPLETE";
      badges.push(h(`span.badge.sr-flag${complete ? ".ok" : ".warn"}`, { "data-flag": "completion" },
        t(complete ? "sr_complete" : "sr_partial")));
    }
    if (doc.verification) {
      const verified = doc.verification === "VERIFIED";
      badges.push(h(`span.badge.sr-flag${verified ? ".ok" : ".warn"}`, { "data-flag": "verification" },
        t(verified ? "sr_verified" : "sr_unverified")));
    }
    const facts = [];
    const when = dateTimeText("DATETIME", `${doc.content_date || ""}${doc.content_time || ""}`);
    if (when) facts.push(h("span.sr-fact", h("span.hlabel", t("sr_content_date")), " ", when));
    if ((doc.observers || []).length) {
      facts.push(h("span.sr-fact.sr-observers", h("span.hlabel", t("sr_observer")), " ",
        doc.observers.map(formatPN).join(", ")));
    }
    for (const o of doc.verifying_observers || []) {
      facts.push(h("span.sr-fact.sr-verifier", h("span.hlabel", t("sr_verified_by")), " ",
        [formatPN(o.name), o.organization, dateTimeText("DATETIME", o.at)].filter(Boolean).join(" · ")));
    }
    const article = h("article.sr-document", { dataset: { sopUid: doc.sop_uid } },
      h("header.sr-head",
        h("h2.sr-title", { title: codeTitle(doc.title) }, title),
        h("div.sr-badges", h("span.muted", doc.sop_class || ""), ...badges),
        facts.length ? h("div.sr-facts", facts) : null),
    );
    const body = h("div.sr-body");
    for (const child of (doc.content && doc.content.children) || []) body.append(this.node(child, 3, article));
    if (doc.content && doc.content.truncated) body.append(h("p.sr-truncated.muted", t("sr_truncated")));
    article.append(body);
    if (doc.truncated && !(doc.content && doc.content.truncated)) {
      article.append(h("p.sr-truncated.muted", t("sr_truncated")));
    }
    return article;
  }

  /** One content item (and its children): a section for a container, else a row. */
  node(item, level, article) {
    const children = (item.children || []).map((c) => this.node(c, Math.min(level + 1, 6), article));
    if (item.truncated) children.push(h("p.sr-truncated.muted", t("sr_truncated")));
    if (item.value_type === "CONTAINER") {
      const heading = h(`h${level}.sr-heading`, { title: codeTitle(item.concept) }, codeText(item.concept) || "—");
      return h("section.sr-container", { dataset: { itemId: item.id } }, heading, ...children);
    }
    const rel = RELATIONSHIPS[item.relationship];
    const row = h("div.sr-row", {
      dataset: { itemId: item.id, valueType: item.value_type }, title: item.relationship || "",
    },
      rel ? h("span.sr-rel", t(rel)) : null,
      item.concept ? h("span.sr-concept", { title: codeTitle(item.concept) }, `${codeText(item.concept)}: `) : null,
      this.value(item, article));
    return children.length ? h("div.sr-item", row, h("div.sr-children", children)) : row;
  }

  value(item, article) {
    const v = item.value;
    if (item.error) return h("span.sr-value.muted", t("sr_unreadable"));
    switch (item.value_type) {
      case "TEXT":
        return h("span.sr-value.sr-text", v || "");
      case "CODE":
        return h("span.sr-value", { title: codeTitle(v) }, codeText(v));
      case "NUM": {
        if (!v) return h("span.sr-value.muted", "—");
        const unit = v.unit ? unitText(v.unit.meaning || v.unit.value) : "";
        const shown = v.number || (v.qualifier ? codeText(v.qualifier) : "");
        return h("span.sr-value.sr-num", { title: v.unit ? `${v.unit.value} (${v.unit.scheme})` : "" },
          h("b", shown), unit ? ` ${unit}` : "");
      }
      case "DATETIME":
      case "DATE":
      case "TIME":
        return h("span.sr-value", { title: v || "" }, dateTimeText(item.value_type, v));
      case "PNAME":
        return h("span.sr-value", formatPN(v));
      case "UIDREF":
        return h("span.sr-value.sr-uid", v || "");
      case "IMAGE":
      case "COMPOSITE":
      case "WAVEFORM":
        return this.reference(v);
      case "SCOORD":
      case "SCOORD3D":
      case "TCOORD":
        return h("span.sr-value.sr-coords", { title: (v && v.data ? v.data.join(", ") : "") },
          `${item.value_type} ${v ? v.graphic_type : ""} · ${t("sr_points", { n: v ? v.points : 0 })}`);
      case "REFERENCE":
        return this.byReference(v, article);
      default:
        return h("span.sr-value.muted", item.value_type);
    }
  }

  /** An image (or other object) the report refers to: a link that opens it when the archive has it. */
  reference(v) {
    if (!v) return h("span.sr-value.muted", "—");
    const frame = (v.frames || [])[0] || null;
    const label = `${t("sr_open_image")}${frame ? ` (${t("sr_frame", { n: frame })})` : ""}`;
    if (!v.location) {
      return h("span.sr-value.muted.sr-image-missing", { title: v.sop_uid }, t("sr_image_missing"));
    }
    const target = { study_uid: v.location.study_uid, series_uid: v.location.series_uid, sop_uid: v.sop_uid, frame };
    return h("a.sr-value.sr-image-link", {
      href: `#/study/${encodeURIComponent(target.study_uid)}`,
      title: v.sop_uid,
      dataset: { sopUid: v.sop_uid, seriesUid: target.series_uid, studyUid: target.study_uid },
      onclick: (event) => {
        event.preventDefault();
        this.onOpenImage(target);
      },
    }, label);
  }

  /** A by-reference relationship: a link to the item it names, never followed further. */
  byReference(v, article) {
    if (!v || !v.found) return h("span.sr-value.muted.sr-ref-missing", t("sr_ref_missing", { id: v ? v.target : "?" }));
    return h("a.sr-value.sr-ref", {
      href: "#",
      dataset: { target: v.target },
      onclick: (event) => {
        event.preventDefault();
        const el = article.querySelector(`[data-item-id="${CSS.escape(v.target)}"]`);
        if (!el) return;
        el.scrollIntoView({ block: "center" });
        el.classList.remove("sr-flash");
        void el.offsetWidth; // restart the highlight
        el.classList.add("sr-flash");
      },
    }, `${t("sr_see_item")} ${codeText(v.concept) || v.target} (${v.target})`);
  }
}

// -- a study's radiation dose ------------------------------------------------------------
function quantity(q) {
  return q ? `${number(q.value)} ${unitText(q.unit)}` : "";
}

/** The dose summary box of the study screen (hidden until a dose report is found). */
export class DoseSummary {
  constructor(studyUid) {
    this.studyUid = studyUid;
    this.data = null;
    this.element = h("details#dose-summary.dose-summary", { hidden: true });
  }

  async load() {
    try {
      this.data = await api("GET", `/api/studies/${encodeURIComponent(this.studyUid)}/dose`);
    } catch {
      return; /* the images and the report are shown without it */
    }
    this.render();
  }

  render() {
    const reports = (this.data && this.data.reports) || [];
    this.element.hidden = !reports.length;
    if (!reports.length) return;
    const total = this.data.ct_dlp_total;
    // A report an updated one repeats (superseded_by) is shown, its events are not counted again.
    const events = reports.filter((r) => !r.superseded_by).reduce((n, r) => n + ((r.events || []).length), 0);
    const summary = h("summary.dose-line", h("b", t("dose_title")));
    if (total) summary.append(" · ", t("dose_total_dlp"), " ", h("b#dose-total-dlp", quantity(total)));
    // The study's DAP: every projection report's, in one unit (the server adds them).
    if (this.data.dap_total) {
      summary.append(" · ", t("dose_dap_total"), " ", h("b#dose-total-dap", quantity(this.data.dap_total)));
    }
    summary.append(" · ", h("span#dose-event-count", t("dose_events", { n: events })));
    const tables = reports.map((r) => (r.error ? h("p.error", `${t("dose_unreadable")}: ${r.error}`) : this.table(r)));
    if (this.data.unread) tables.push(h("p#dose-unread.muted", t("dose_unread", { n: this.data.unread })));
    const open = this.element.open;
    this.element.replaceChildren(summary, ...tables);
    this.element.open = open;
  }

  table(report) {
    const ct = report.modality === "CT";
    const events = report.events || [];
    const kinds = ct ? ["ctdivol", "dlp", "scanning_length"] : ["dap", "dose_rp"];
    const names = ct ? ["CTDIvol", "DLP", t("dose_length")] : ["DAP", t("dose_rp")];
    // Each figure's unit once, in its heading (an RDSR gives each in one unit); another unit stays in its cell.
    const units = kinds.map((k) => (events.find((e) => e[k]) || {})[k]?.unit || "");
    const heads = [t("dose_protocol"), t("dose_region"),
      ...names.map((name, i) => (units[i] ? `${name} (${unitText(units[i])})` : name))];
    const cell = (q, i) => h("td.num", q ? (q.unit === units[i] ? number(q.value) : quantity(q)) : "");
    const rows = events.map((e) => h("tr.dose-event",
      h("td", e.protocol || e.kind || ""),
      h("td", e.target_region || ""),
      kinds.map((k, i) => cell(e[k], i))));
    const computed = report.dlp_total_computed ? ` ${t("dose_computed")}` : "";
    const totals = ct
      ? [report.dlp_total ? `${t("dose_total_dlp")} ${quantity(report.dlp_total)}${computed}` : ""]
      : [report.dap_total ? `${t("dose_dap_total")} ${quantity(report.dap_total)}` : "",
        report.dose_rp_total ? `${t("dose_rp_total")} ${quantity(report.dose_rp_total)}` : ""];
    const replaced = report.superseded_by ? ".dose-superseded" : "";
    return h(`div.dose-report${replaced}`, { dataset: { sopUid: report.sop_uid } },
      h("div.muted", [report.procedure, ...totals].filter(Boolean).join(" · ")),
      report.superseded_by ? h("div.muted.dose-superseded-note", t("dose_superseded")) : null,
      h("table.dose-events", h("thead", h("tr", heads.map((x) => h("th", x)))), h("tbody", rows)));
  }
}
