// The worklist: search form, study table (rows open the study), paging.

import { api } from "./api.js";
import { claimName } from "./claim.js";
import { onLangChange, t } from "./i18n.js";
import {
  formatDate, formatDateTime, formatPN, formatTime, h, isTyping, listText, readSession, sexLabel, toDicomDate,
  writeSession,
} from "./util.js";

const FILTER_KEY = "pacs.worklist";
const PAGE_SIZE = 50;
const MODALITIES = ["CT", "MR", "DX", "CR", "US", "MG", "XA"];
const STATUSES = ["unread", "draft", "signed"];
const PRIORITIES = ["stat", "high", "urgent", "routine"];
// The priorities shown as a badge: STAT "Cấp cứu" (red), HIGH "Khẩn" (orange).
const URGENT = new Set(["STAT", "HIGH"]);
// The columns that sort the list (pacs.studylist.SORTS): the default puts urgent unread studies first.
const SORT_COLUMNS = { col_priority: "priority", col_date: "date", col_waiting: "waiting" };
const READERS = new Set(["radiologist", "admin"]);
// The list asks again this often while the page is shown (a new STAT study appears without reload), never
// while hidden nor while a request is under way (a slow server gets no pile-up); a page shown again after
// longer asks at once.
const REFRESH_MS = 30000;

function loadFilters() {
  return { offset: 0, sort: "priority", ...readSession(FILTER_KEY) };
}

function saveFilters(filters) {
  writeSession(FILTER_KEY, filters);
}

/** The worklist opens on the urgent studies (the top bar's count, which no search narrows): unread first. */
export function showUrgent() {
  writeSession(FILTER_KEY, { priority: "urgent", sort: "priority", offset: 0 });
}

/** The red "Cấp cứu / STAT" or orange "Khẩn / Urgent" badge of a study's priority; null for others. */
export function priorityBadge(priority) {
  if (!URGENT.has(priority)) return null;
  const key = `priority_${priority}`;
  return h("span.badge", {
    class: `badge priority priority-${priority.toLowerCase()}`, "data-i18n": key, "data-i18n-title": `${key}_title`,
    title: t(`${key}_title`), dataset: { priority },
  }, t(key));
}

/** How long a study has waited: "12 phút", "3 giờ", "2 ngày". */
export function waitingText(ms) {
  const minutes = Math.max(0, Math.floor(ms / 60000));
  if (minutes < 60) return t("waiting_minutes", { n: minutes });
  const hours = Math.floor(minutes / 60);
  return hours < 48 ? t("waiting_hours", { n: hours }) : t("waiting_days", { n: Math.floor(hours / 24) });
}

/** The top bar's count of urgent studies not yet read (hidden when none, or not told). */
function showUrgentCount(n) {
  const el = document.getElementById("urgent-count");
  if (!el) return;
  el.hidden = !(n > 0);
  el.dataset.count = String(n || 0);
  el.textContent = n > 0 ? t("urgent_count", { n }) : "";
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
  // When the list was last asked for (Date.now()): the refresh waits REFRESH_MS from any load.
  let loadedAt = 0;

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
  const priority = h(
    "select#search-priority",
    h("option", { value: "", "data-i18n": "all" }),
    PRIORITIES.map((p) => h("option", { value: p, "data-i18n": `priority_opt_${p}` })),
  );
  priority.value = filters.priority || "";
  const reader = Boolean(ctx.user && READERS.has(ctx.user.role));
  const mine = h("input#search-mine", { type: "checkbox" });
  mine.checked = reader && Boolean(filters.mine);

  const form = h(
    "form#search-form.search",
    field("search-name", "search_name", name),
    field("search-patient-id", "search_pid", pid),
    field("search-accession", "col_accession", accession),
    field("search-date-from", "date_from", from),
    field("search-date-to", "date_to", to),
    field("search-modality", "modality", modality),
    field("search-status", "report_status", status),
    field("search-priority", "filter_priority", priority),
    reader ? h("div.field.check", { "data-i18n-title": "filter_mine_title" },
      h("label", { for: "search-mine", "data-i18n": "filter_mine" }), mine) : null,
    h(
      "div.field.buttons",
      h("button#search-button.btn.primary", { type: "submit", "data-i18n": "search_button" }),
      h("button#clear-button.btn", { type: "button", "data-i18n": "clear_button", onclick: clear }),
    ),
  );

  const tbody = h("tbody#worklist-body");
  const message = h("div#worklist-message.message", { role: "status" });
  const COLUMNS = [
    ["col_priority", "6%"], ["col_patient", "13%"], ["col_pid", "8%"], ["col_birth", "7%"], ["col_sex", "4%"],
    ["col_date", "9%"], ["col_accession", "8%"], ["col_modality", "5%"], ["col_description", null],
    ["col_images", "7%"], ["col_waiting", "6%"], ["col_status", "14%"],
  ];
  const sorters = {};
  const header = (key) => {
    if (!SORT_COLUMNS[key]) return h("th", { scope: "col", "data-i18n": key });
    const sort = SORT_COLUMNS[key];
    const button = h(`button#sort-${sort}.sort`, {
      type: "button", "data-i18n": key, "data-i18n-title": `sort_${sort}`, title: t(`sort_${sort}`),
      onclick: () => {
        filters.sort = sort;
        filters.offset = 0;
        load();
      },
    });
    sorters[sort] = button;
    return h("th", { scope: "col" }, button);
  };
  const table = h(
    "table#worklist.worklist",
    h("colgroup", COLUMNS.map(([, width]) => h("col", width ? { style: `width:${width}` } : {}))),
    h("thead", h("tr", COLUMNS.map(([key]) => header(key)))),
    tbody,
  );
  function markSort() {
    for (const [sort, button] of Object.entries(sorters)) {
      const on = filters.sort === sort;
      button.classList.toggle("active", on);
      button.parentElement.setAttribute("aria-sort", on ? (sort === "date" ? "descending" : "ascending") : "none");
    }
  }
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
    filters.priority = priority.value;
    filters.mine = reader && mine.checked;
  }

  function clear() {
    for (const input of [name, pid, accession, from, to]) input.value = "";
    modality.value = "";
    status.value = "";
    priority.value = "";
    mine.checked = false;
    filters.sort = "priority";
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
  for (const select of [modality, status, priority, mine]) {
    select.addEventListener("change", () => {
      readForm();
      filters.offset = 0;
      load();
    });
  }

  function open(uid) {
    ctx.navigate(`#/study/${encodeURIComponent(uid)}`);
  }

  // The database's clock minus this browser's: waiting times are counted on the server's.
  let skew = 0;
  const unreported = (item) => item.report_status !== "signed";

  function waitingCell(item) {
    const received = item.received_at ? Date.parse(item.received_at) : NaN;
    if (!unreported(item) || Number.isNaN(received)) return h("td.num.waiting");
    return h("td.num.waiting", {
      title: t("waiting_title", { when: formatDateTime(item.received_at) }), dataset: { received: String(received) },
    }, waitingText(Date.now() + skew - received));
  }

  function statusCell(item) {
    const claim = item.claim;
    const who = claim ? (claim.mine ? t("claim_by_me") : t("claim_by", { name: claimName(claim) })) : "";
    return h("td.status", { title: who },
      statusBadge(item.report_status),
      // On a line of its own under the status: a colleague's name is read whole.
      claim ? h("span.claim", { class: `claim${claim.mine ? " mine" : ""}`, "data-testid": "claim" }, who) : null);
  }

  function row(item) {
    const urgent = URGENT.has(item.priority) && unreported(item);
    const tr = h(
      "tr",
      {
        tabindex: "0",
        "data-testid": "study-row",
        class: urgent ? `urgent urgent-${item.priority.toLowerCase()}` : null,
        dataset: {
          studyUid: item.study_uid, modalities: listText(item.modalities), reportStatus: item.report_status || "none",
          priority: item.priority || "", claimedBy: item.claim ? item.claim.user : "",
        },
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
      h("td.priority", priorityBadge(item.priority)),
      h("td.name", { title: formatPN(item.patient_name) }, formatPN(item.patient_name)),
      h("td", { title: item.patient_id || "" }, item.patient_id || ""),
      h("td", formatDate(item.birth_date)),
      h("td", sexLabel(item.sex)),
      h("td", `${formatDate(item.study_date)} ${formatTime(item.study_time)}`.trim()),
      h("td", { title: item.accession || "" }, item.accession || ""),
      h("td", listText(item.modalities)),
      h("td", { title: item.description || "" }, item.description || ""),
      h("td.num", `${item.num_series ?? ""} / ${item.num_instances ?? ""}`),
      waitingCell(item),
      statusCell(item),
    );
    return tr;
  }

  /** Waiting times move on between loads (no request: the clock of the last answer). */
  function tick() {
    for (const cell of tbody.querySelectorAll("td.waiting[data-received]")) {
      cell.textContent = waitingText(Date.now() + skew - Number(cell.dataset.received));
    }
  }
  const ticker = setInterval(tick, 30000);

  /** The rows for *items*; a refresh keeps the focused row (the keyboard's selection) and the scroll position. */
  function showRows(items, refreshing) {
    if (!refreshing) {
      tbody.replaceChildren(...items.map(row));
      return;
    }
    const focused = tbody.contains(document.activeElement) ? document.activeElement.dataset.studyUid : null;
    const place = focused ? [...tbody.children].indexOf(document.activeElement) : -1;
    const wrap = table.parentElement;
    const page = document.scrollingElement;
    const [wrapTop, pageTop] = [wrap.scrollTop, page ? page.scrollTop : 0];
    tbody.replaceChildren(...items.map(row));
    wrap.scrollTop = wrapTop;
    if (page) page.scrollTop = pageTop;
    if (focused) {
      // The study gone from the list (signed by a colleague): the row now in its place, so that the keyboard
      // stays in the list (on the page the arrows would scroll it and Enter open nothing).
      const again = [...tbody.children].find((tr) => tr.dataset.studyUid === focused)
        || tbody.children[Math.min(place, tbody.children.length - 1)];
      if (again) again.focus({ preventScroll: true });
    }
  }

  function show(data, refreshing = false) {
    const unchanged = refreshing && lastData && JSON.stringify(lastData.items) === JSON.stringify(data.items);
    lastData = data;
    const items = (data && data.items) || [];
    const total = data && Number.isFinite(data.total) ? data.total : items.length;
    const now = data && data.now ? Date.parse(data.now) : NaN;
    skew = Number.isNaN(now) ? 0 : now - Date.now();
    if (unchanged) tick(); // the same rows: left as they are (a text selected in them stays)
    else showRows(items, refreshing);
    if (data && "urgent_unread" in data) showUrgentCount(data.urgent_unread);
    markSort();
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

  /** Load the list; *refreshing*: the automatic refresh (no "loading", nothing aborted, skipped while busy). */
  async function load(refreshing = false) {
    if (refreshing && controller) return; // the previous request is still under way
    saveFilters(filters);
    if (filters.date_from && filters.date_to && filters.date_from > filters.date_to) {
      if (refreshing) return;
      tbody.replaceChildren();
      lastData = null; // no rows shown: a refresh must not take them for the ones on screen
      message.textContent = t("dates_reversed");
      message.className = "message error";
      return;
    }
    if (controller) controller.abort();
    const mine = new AbortController();
    controller = mine;
    const signal = mine.signal;
    loadedAt = Date.now();
    if (!refreshing) {
      message.textContent = t("loading");
      message.className = "message";
      table.setAttribute("aria-busy", "true");
    }
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
          priority: filters.priority,
          mine: filters.mine ? "true" : "",
          sort: filters.sort || "priority",
          limit: PAGE_SIZE,
          offset: filters.offset,
        },
        signal,
        // The refresh is nobody's use: a workstation left on the list still signs out when idle.
        unattended: refreshing,
      });
      if (signal.aborted) return;
      const total = data && Number.isFinite(data.total) ? data.total : 0;
      if (!((data && data.items) || []).length && filters.offset > 0) {
        // The list got shorter since this page was opened (the study just
        // signed left the "unread" list, a study was deleted): its last page,
        // not "no studies found" over studies that are there.
        filters.offset = total > 0 ? Math.floor((total - 1) / PAGE_SIZE) * PAGE_SIZE : 0;
        controller = null;
        load(refreshing);
        return;
      }
      show(data, refreshing);
    } catch (exc) {
      // A refresh that failed leaves the list shown; the next one tries again.
      if (exc.name === "AbortError" || exc.status === 401 || refreshing) return;
      tbody.replaceChildren();
      // The rows are gone: the next refresh shows what it gets, even the rows shown before the failure.
      lastData = null;
      message.textContent = exc.message;
      message.className = "message error";
    } finally {
      if (controller === mine) controller = null;
      if (!signal.aborted) table.removeAttribute("aria-busy");
    }
  }

  /** The automatic refresh: only while the page is shown, REFRESH_MS after the last load, and not while text of
   * the list is selected (to copy a patient ID: replacing the rows would drop it). */
  function refresh() {
    if (document.hidden || Date.now() - loadedAt < REFRESH_MS - 1000) return;
    const selection = window.getSelection();
    if (selection && !selection.isCollapsed && tbody.contains(selection.anchorNode)) return;
    load(true);
  }
  const refresher = setInterval(refresh, REFRESH_MS);
  document.addEventListener("visibilitychange", refresh);

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
      clearInterval(ticker);
      clearInterval(refresher);
      document.removeEventListener("visibilitychange", refresh);
      offLang();
      if (controller) controller.abort();
    },
  };
}
