// The department's activity (thống kê) for administrators (#/activity): a
// period, its totals and tables (GET /api/activity), each table also a CSV
// download for Excel (the session cookie authorises it; the server audits it).

import { api } from "./api.js";
import { getLang, redrawOnLangChange, t } from "./i18n.js";
import { h, showFailure } from "./util.js";

// Each table: its key in the answer, its heading, and its columns
// [field, label key, kind] (kind "num": right-aligned, grouped digits; "gb":
// bytes as GB; "order": a procedure, or "no order" for the studies without one).
const TABLES = [
  ["exams", "activity_exams", [
    ["modality", "activity_modality"], ["station", "activity_station"], ["studies", "activity_studies", "num"],
    ["instances", "activity_instances", "num"], ["bytes", "activity_gb", "gb"]]],
  ["procedures", "activity_procedures", [
    ["modality", "activity_modality"], ["code", "activity_code"], ["procedure", "activity_procedure", "order"],
    ["studies", "activity_studies", "num"]]],
  ["reads", "activity_reads", [
    ["radiologist", "activity_radiologist"], ["login", "activity_login"], ["modality", "activity_modality"],
    ["reads", "activity_read_count", "num"], ["amendments", "activity_amendments", "num"]]],
  ["turnaround", "activity_turnaround", [
    ["group", "activity_group"], ["reads", "activity_read_count", "num"],
    ["median_minutes", "activity_median", "num"], ["p90_minutes", "activity_p90", "num"],
    ["max_minutes", "activity_max", "num"]]],
  ["waiting", "activity_waiting", [
    ["modality", "activity_modality"], ["studies", "activity_studies", "num"],
    ["oldest_arrived", "activity_oldest"]]],
  ["days", "activity_days", [["day", "activity_day"], ["studies", "activity_studies", "num"]]],
];

function cell(value, kind) {
  if (kind === "order") return value || t("activity_no_order");
  const locale = getLang() === "vi" ? "vi-VN" : "en-GB";
  if (kind === "gb") return (Number(value) / 1e9).toLocaleString(locale, { maximumFractionDigits: 2 });
  if (kind === "num") return Number(value).toLocaleString(locale);
  if (typeof value === "string" && /^\d{4}-\d\d-\d\dT/.test(value)) return value.slice(0, 16).replace("T", " ");
  return value === null || value === undefined ? "" : String(value);
}

const numeric = (kind) => kind === "num" || kind === "gb";

/** Mount the activity screen in `el`; returns {cleanup()}. */
export function mountActivity(el, ctx) {
  const controller = new AbortController();
  let shown = null; // the last answer, drawn again on a language switch
  const first = h("input#activity-from", { type: "date" });
  const last = h("input#activity-to", { type: "date" });
  const message = h("div#activity-message.message", { role: "status" });
  const totals = h("p#activity-totals.activity-totals");
  const tables = h("div#activity-tables.activity-tables");
  const form = h("form#activity-form.search", {
    onsubmit: (event) => {
      event.preventDefault();
      load();
    },
  },
  h("div.field", h("label", { for: "activity-from", "data-i18n": "date_from" }), first),
  h("div.field", h("label", { for: "activity-to", "data-i18n": "date_to" }), last),
  h("button#activity-show.btn", { type: "submit", "data-i18n": "activity_show" }));
  el.append(h("section.activity", h("h2", { "data-i18n": "activity_title" }), form, message, totals, tables));

  if (!ctx.user || ctx.user.role !== "admin") {
    form.hidden = true;
    message.textContent = t("activity_admin_only");
    return { cleanup: () => controller.abort() };
  }

  function period() {
    const query = {};
    if (first.value) query.from = first.value;
    if (last.value) query.to = last.value;
    return query;
  }

  function draw() {
    if (!shown) return;
    const sum = shown.totals;
    totals.textContent = t("activity_summary", {
      from: shown.from, to: shown.to, studies: cell(sum.studies, "num"), instances: cell(sum.instances, "num"),
      gb: cell(sum.bytes, "gb"), reads: cell(sum.reads, "num"), amendments: cell(sum.amendments, "num"),
      waiting: cell(sum.waiting, "num"), critical: cell(sum.critical, "num"),
      critical_open: cell(sum.critical_open, "num"),
    });
    const query = new URLSearchParams({ from: shown.from, to: shown.to }).toString();
    tables.replaceChildren(...TABLES.map(([key, heading, columns]) => {
      const rows = shown[key] || [];
      return h(`section#activity-${key}.activity-table`,
        h("h3", t(heading), " ",
          h(`a#activity-${key}-csv.btn.small`, { href: `/api/activity/${key}.csv?${query}`, download: "" }, "CSV")),
        rows.length === 0
          ? h("p.message", t("activity_none"))
          : h("table.worklist",
            h("thead", h("tr", ...columns.map(([, label, kind]) => h(numeric(kind) ? "th.num" : "th", t(label))))),
            h("tbody", ...rows.map((row) => h("tr", ...columns.map(([field, , kind]) =>
              h(numeric(kind) ? "td.num" : "td", cell(row[field], kind))))))));
    }));
  }

  async function load() {
    message.classList.remove("error");
    message.textContent = t("loading");
    try {
      shown = await api("GET", "/api/activity", { query: period(), signal: controller.signal });
      first.value = shown.from;
      last.value = shown.to;
      message.textContent = "";
      draw();
    } catch (exc) {
      showFailure(message, exc);
    }
  }

  const unsubscribe = redrawOnLangChange(el, draw);
  load();
  return {
    cleanup() {
      controller.abort();
      unsubscribe();
    },
  };
}
