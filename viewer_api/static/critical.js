// Critical results (kết quả nguy kịch, #/critical): the open ones, the longest
// waiting first, each acknowledged from its row as from the study's report;
// or the acknowledged ones. The menu entry's badge counts the open ones.

import { api } from "./api.js";
import { applyI18n, redrawOnLangChange, t } from "./i18n.js";
import { formatDateTime, formatPN, h, showFailure, toast } from "./util.js";

// The roles GET /api/critical answers (viewer_api.critical_api.LISTERS); the server checks it too.
export const CRITICAL_LISTERS = new Set(["radiologist", "admin", "emr", "his"]);
// Beyond this a critical result has waited too long for its acknowledgement: shown in red.
const LATE_MINUTES = 30;

/** Show *n* open critical results on the menu entry (none: no badge). */
export function showCriticalCount(n) {
  const el = document.getElementById("critical-count");
  if (!el) return;
  el.textContent = n > 0 ? String(n) : "";
  el.hidden = !(n > 0);
}

/** Count the open critical results again: limit=0 asks for the total only (no patient listed, or audited).
 * options: api()'s signal and unattended (a periodic count does not keep the session alive). */
export async function refreshCriticalCount(options = {}) {
  const data = await api("GET", "/api/critical", { query: { state: "open", limit: 0 }, ...options });
  showCriticalCount(Number(data.total) || 0);
}

/** Ask who was told of the study's critical result, and how, and record it
 * (POST .../critical/ack): true when recorded, false when refused (a 409:
 * someone acknowledged first), null when the question was cancelled. The
 * study's report and the list both call it, and redraw after an answer. */
export async function acknowledgeCritical(studyUid) {
  const told = (prompt(t("critical_ack_prompt")) || "").trim();
  if (!told) return null;
  try {
    await api("POST", `/api/studies/${encodeURIComponent(studyUid)}/report/critical/ack`,
      { json: { acknowledgement: told } });
    toast(t("critical_acked"));
  } catch (exc) {
    toast(exc && exc.message ? exc.message : String(exc), "error");
    return false;
  }
  // The badge follows, for those who have it (a referring doctor acknowledges too, and may not list them).
  const entry = document.getElementById("nav-critical");
  if (entry && !entry.hidden) refreshCriticalCount().catch(() => {}); // corrected at the next count anyway
  return true;
}

// Columns: [label key, class, cell(item)]; the open list's and the acknowledged list's.
const PATIENT = [
  ["col_patient", "critical-patient", (c) => formatPN(c.patient_name)],
  ["col_pid", "critical-patient-id", (c) => c.patient_id],
  ["col_accession", "critical-accession", (c) => c.accession],
  ["col_modality", "critical-modality", (c) => c.modality],
  ["critical_signed", "critical-signed", (c) => `${c.flagged_by}, ${formatDateTime(c.flagged_at)}`],
  ["critical_note", "critical-note", (c) => c.note],
];
const OPEN_COLUMNS = [["critical_minutes", "critical-minutes", minutes], ...PATIENT];
const ACKNOWLEDGED_COLUMNS = [["critical_minutes_to_ack", "critical-minutes", minutes], ...PATIENT,
  ["critical_acknowledged_by", "critical-acknowledged-by", (c) => c.acknowledged_by],
  ["critical_told_how", "critical-told", (c) => c.acknowledgement],
  ["critical_acknowledged_at", "critical-acknowledged-at", (c) => formatDateTime(c.acknowledged_at)]];

// Minutes open on the server's clock (minutes_open), not the workstation's, which may be off.
function minutes(item) {
  return t("critical_minutes_n", { n: item.minutes_open });
}

/** Mount the critical results screen in `el`; returns {cleanup(), refresh()}. */
export function mountCritical(el, ctx) {
  let controller = new AbortController();
  let shown = null; // the last answer, drawn again on a language switch
  const message = h("div#critical-message.message", { role: "status" });
  const acknowledged = h("input#critical-show-acknowledged", { type: "checkbox", onchange: () => load() });
  const switcher = h("label.critical-switch", acknowledged, h("span", { "data-i18n": "critical_show_acked" }));
  const list = h("div#critical-tables");
  el.append(h("section.critical-screen", h("h2", { "data-i18n": "critical_title" }), switcher, message, list));

  if (!ctx.user || !CRITICAL_LISTERS.has(ctx.user.role)) {
    switcher.hidden = true;
    message.textContent = t("critical_not_allowed");
    return { cleanup: () => controller.abort() };
  }

  function row(item, columns, open) {
    const late = open && item.minutes_open > LATE_MINUTES;
    return h("tr",
      ...columns.map(([, cls, value]) => h(`td.${cls}${cls === "critical-minutes" && late ? ".late" : ""}`,
        value(item))),
      h("td.critical-actions",
        h("a.btn.small.critical-open", { href: `#/study/${encodeURIComponent(item.study_uid)}`,
          "data-i18n": "critical_open_study" }),
        open ? h("button.btn.small.critical-ack", { type: "button", "data-i18n": "critical_ack",
          onclick: async () => {
            // Recorded or refused (someone else recorded it first): the list shows what is open now.
            if ((await acknowledgeCritical(item.study_uid)) !== null) load();
          } }) : null));
  }

  function draw() {
    if (!shown) return;
    const open = shown.state === "open";
    const columns = open ? OPEN_COLUMNS : ACKNOWLEDGED_COLUMNS;
    const items = shown.critical || [];
    message.textContent = items.length ? "" : t(open ? "critical_none_open" : "critical_none_acked");
    list.replaceChildren(items.length === 0 ? "" : h("table#critical-list.worklist.critical-list",
      h("thead", h("tr", ...columns.map(([label]) => h("th", { "data-i18n": label })), h("th"))),
      h("tbody", ...items.map((item) => row(item, columns, open)))));
    applyI18n(list);
  }

  async function load(unattended = false) {
    controller.abort(); // the switch flipped while a list was coming: the later one wins
    controller = new AbortController();
    const { signal } = controller;
    const state = acknowledged.checked ? "acknowledged" : "open";
    message.classList.remove("error");
    try {
      const data = await api("GET", "/api/critical", { query: { state, limit: 200 }, signal, unattended });
      shown = data;
      draw();
      if (state === "open") showCriticalCount(Number(data.total) || 0);
      else await refreshCriticalCount({ signal, unattended });
    } catch (exc) {
      showFailure(message, exc);
    }
  }

  const unsubscribe = redrawOnLangChange(el, draw);
  load();
  return {
    refresh: () => load(true), // the app's periodic refresh
    cleanup() {
      controller.abort();
      unsubscribe();
    },
  };
}
