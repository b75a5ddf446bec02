// The worklist: search form, study table (rows open the study), paging.

import { api } from "./api.js";
import { onLangChange, t } from "./i18n.js";
import { formatDate, formatPN, formatTime, h, isTyping, listText, readSession, sexLabel, toDicomDate, writeSession } from "./util.js";

const FILTER_KEY = "pacs.worklist";
const PAGE_SIZE = 50;
const MODALITIES = ["CT", "MR", "DX", "CR", "US", "MG", "XA"];
const STATUSES = ["unread", "draft", "signed"];

function loadFilters() {
  return { offset: 0, ...readSession(FILTER_KEY) };
}

function saveFilters(filters) {
  writeSession(FILTER_KEY, filters);
}

/** The status badge of a worklist row or a report ("none" and "unread" read the same). */
export function statusBadge(status) {
  const s = status || "none";
  const key = s === "none" || s === "unread" ? "status_unread" : `status_${s}`;
  return h("span.badge", { class: `badge status-${s}`, "data-i18n": key, dataset: { status: s } }, t(key));
}

export function mountWorklist(root, ctx) {
  const filters = loadFilters();
  let controller = null;
  let lastData = null;

  const field = (id, labelKey, input) =>
    h("div.field", h("label", { for: id, "data-i18n": labelKey }), input);

  const name = h("input#search-name", {
    type: "search", value: filters.q || "", "data-i18n-placeholder": "search_name_ph", autocomplete: "off", spellcheck: "false",
  });
  const pid = h("input#search-patient-id", { type: "search", value: filters.patient_id || "", autocomplete: "off" });
  const accession = h("input#search-accession", { type: "search", value: filters.accession || "", autocomplete: "off" });
  const from = h("input#search-date-from", { type: "date", value: filters.date_from || "" });
  const to = h("input#search-date-to", { type: "date", value: filters.date_to || "" });
  const modality = h(
    "select#search-modality",
    h("option", { value: "", "data-i18n": "all" }),
    MODALITIES.map((m) => h("option", { value: m }, m)),
  );
  modality.value = filters.modality || "";
  const status = h(
    "select#search-status",
    h("option", { value: "", "data-i18n": "all" }),
    STATUSES.map((s) => h("option", { value: s, "data-i18n": `status_${s}` })),
  );
  status.value = filters.status || "";

  const form = h(
    "form#search-form.search",
    field("search-name", "search_name", name),
    field("search-patient-id", "search_pid", pid),
    field("search-accession", "col_accession", accession),
    field("search-date-from", "date_from", from),
    field("search-date-to", "date_to", to),
    field("search-modality", "modality", modality),
    field("search-status", "report_status", status),
    h(
      "div.field.buttons",
      h("button#search-button.btn.primary", { type: "submit", "data-i18n": "search_button" }),
      h("button#clear-button.btn", { type: "button", "data-i18n": "clear_button", onclick: clear }),
    ),
  );

  const tbody = h("tbody#worklist-body");
  const message = h("div#worklist-message.message", { role: "status" });
  const table = h(
    "table#worklist.worklist",
    h(
      "colgroup",
      h("col", { style: "width:16%" }),
      h("col", { style: "width:9%" }),
      h("col", { style: "width:8%" }),
      h("col", { style: "width:5%" }),
      h("col", { style: "width:10%" }),
      h("col", { style: "width:10%" }),
      h("col", { style: "width:6%" }),
      h("col"),
      h("col", { style: "width:7%" }),
      h("col", { style: "width:8%" }),
    ),
    h(
      "thead",
      h(
        "tr",
        ["col_patient", "col_pid", "col_birth", "col_sex", "col_date", "col_accession", "col_modality", "col_description", "col_images", "col_status"].map(
          (key) => h("th", { scope: "col", "data-i18n": key }),
        ),
      ),
    ),
    tbody,
  );
  const pageInfo = h("span#page-info.page-info");
  const prev = h("button#prev-page.btn.small", { type: "button", "data-i18n": "prev_page", onclick: () => page(-1) });
  const next = h("button#next-page.btn.small", { type: "button", "data-i18n": "next_page", onclick: () => page(1) });

  root.append(
    h(
      "section.worklist-screen",
      form,
      h("div.table-wrap", table, message),
      h("div.pager", prev, pageInfo, next),
    ),
  );

  function readForm() {
    filters.q = name.value.trim();
    filters.patient_id = pid.value.trim();
    filters.accession = accession.value.trim();
    filters.date_from = from.value;
    filters.date_to = to.value;
    filters.modality = modality.value;
    filters.status = status.value;
  }

  function clear() {
    for (const input of [name, pid, accession, from, to]) input.value = "";
    modality.value = "";
    status.value = "";
    filters.offset = 0;
    readForm();
    load();
    name.focus();
  }

  function page(direction) {
    const total = lastData ? lastData.total : 0;
    const offset = Math.max(0, filters.offset + direction * PAGE_SIZE);
    if (offset === filters.offset || (direction > 0 && offset >= total)) return;
    filters.offset = offset;
    load();
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    readForm();
    filters.offset = 0;
    load();
  });
  for (const select of [modality, status]) {
    select.addEventListener("change", () => {
      readForm();
      filters.offset = 0;
      load();
    });
  }

  function open(uid) {
    ctx.navigate(`#/study/${encodeURIComponent(uid)}`);
  }

  function row(item) {
    const tr = h(
      "tr",
      {
        tabindex: "0",
        "data-testid": "study-row",
        dataset: { studyUid: item.study_uid, modalities: listText(item.modalities), reportStatus: item.report_status || "none" },
        onclick: () => open(item.study_uid),
        onkeydown: (event) => {
          if (event.key === "Enter") open(item.study_uid);
          else if (event.key === "ArrowDown" && tr.nextElementSibling) {
            event.preventDefault();
            tr.nextElementSibling.focus();
          } else if (event.key === "ArrowUp") {
            event.preventDefault();
            (tr.previousElementSibling || name).focus();
          }
        },
      },
      h("td.name", { title: formatPN(item.patient_name) }, formatPN(item.patient_name)),
      h("td", { title: item.patient_id || "" }, item.patient_id || ""),
      h("td", formatDate(item.birth_date)),
      h("td", sexLabel(item.sex)),
      h("td", `${formatDate(item.study_date)} ${formatTime(item.study_time)}`.trim()),
      h("td", { title: item.accession || "" }, item.accession || ""),
      h("td", listText(item.modalities)),
      h("td", { title: item.description || "" }, item.description || ""),
      h("td.num", `${item.num_series ?? ""} / ${item.num_instances ?? ""}`),
      h("td", statusBadge(item.report_status)),
    );
    return tr;
  }

  function show(data) {
    lastData = data;
    const items = (data && data.items) || [];
    const total = data && Number.isFinite(data.total) ? data.total : items.length;
    tbody.replaceChildren(...items.map(row));
    message.textContent = items.length ? "" : t("no_results");
    message.className = "message";
    const first = items.length ? filters.offset + 1 : 0;
    // total_exact false: at least that many (the server counts so far past the page).
    const shown = data && data.total_exact === false ? `${total}+` : total;
    pageInfo.textContent = t("page_info", { from: first, to: filters.offset + items.length, total: shown });
    prev.disabled = filters.offset <= 0;
    next.disabled = filters.offset + items.length >= total;
  }

  function prefix(value) {
    return value && !/[*?]/.test(value) ? `${value}*` : value;
  }

  async function load() {
    saveFilters(filters);
    if (filters.date_from && filters.date_to && filters.date_from > filters.date_to) {
      tbody.replaceChildren();
      message.textContent = t("dates_reversed");
      message.className = "message error";
      return;
    }
    if (controller) controller.abort();
    controller = new AbortController();
    const signal = controller.signal;
    message.textContent = t("loading");
    message.className = "message";
    table.setAttribute("aria-busy", "true");
    try {
      const data = await api("GET", "/api/worklist", {
        query: {
          q: filters.q,
          // IDs are typed from their start (a citizen ID's first digits): prefix matching.
          patient_id: prefix(filters.patient_id),
          accession: prefix(filters.accession),
          date_from: toDicomDate(filters.date_from),
          date_to: toDicomDate(filters.date_to),
          modality: filters.modality,
          status: filters.status,
          limit: PAGE_SIZE,
          offset: filters.offset,
        },
        signal,
      });
      if (signal.aborted) return;
      const total = data && Number.isFinite(data.total) ? data.total : 0;
      if (!((data && data.items) || []).length && filters.offset > 0) {
        // The list got shorter since this page was opened (the study just
        // signed left the "unread" list, a study was deleted): its last page,
        // not "no studies found" over studies that are there.
        filters.offset = total > 0 ? Math.floor((total - 1) / PAGE_SIZE) * PAGE_SIZE : 0;
        load();
        return;
      }
      show(data);
    } catch (exc) {
      if (exc.name === "AbortError" || exc.status === 401) return;
      tbody.replaceChildren();
      message.textContent = exc.message;
      message.className = "message error";
    } finally {
      if (!signal.aborted) table.removeAttribute("aria-busy");
    }
  }

  function onKey(event) {
    if (event.key === "ArrowDown" && (event.target === name || event.target === pid) && tbody.firstElementChild) {
      event.preventDefault(); // from the search fields down into the results
      tbody.firstElementChild.focus();
      return;
    }
    if (event.defaultPrevented || isTyping(event)) return;
    if (event.key === "/") {
      event.preventDefault();
      name.focus();
      name.select();
    }
  }
  document.addEventListener("keydown", onKey);
  const offLang = onLangChange(() => lastData && show(lastData));

  load();
  queueMicrotask(() => name.focus());

  return {
    cleanup() {
      document.removeEventListener("keydown", onKey);
      offLang();
      if (controller) controller.abort();
    },
  };
}
