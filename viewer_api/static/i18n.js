// Labels of the web viewer in Vietnamese (default) and English.
// Elements carry data-i18n="key" (text), data-i18n-placeholder, data-i18n-title
// or data-i18n-aria; applyI18n() fills them in, and listeners registered with
// onLangChange() refresh the dynamic texts when the language is switched.

const STORAGE_KEY = "pacs.lang";

export const LABELS = {
  vi: {
    app_title: "Filmless PACS",
    nav_worklist: "Danh sách ca chụp",
    logout: "Đăng xuất",
    lang_toggle: "EN",
    lang_toggle_title: "Switch to English",
    // login
    login_title: "Đăng nhập",
    username: "Tên đăng nhập",
    password: "Mật khẩu",
    login_button: "Đăng nhập",
    login_failed: "Đăng nhập thất bại",
    wrong_credentials: "sai tên đăng nhập hoặc mật khẩu",
    session_expired: "Phiên làm việc đã hết hạn, vui lòng đăng nhập lại.",
    // worklist
    search_name: "Họ tên bệnh nhân",
    search_name_ph: "vd: nguyen van an",
    search_pid: "Mã bệnh nhân",
    dates_reversed: "Ngày bắt đầu sau ngày kết thúc: đổi lại khoảng ngày.",
    date_from: "Từ ngày",
    date_to: "Đến ngày",
    modality: "Loại máy",
    report_status: "Trạng thái đọc",
    all: "Tất cả",
    status_unread: "Chưa đọc",
    status_none: "Chưa đọc",
    status_draft: "Bản nháp",
    status_signed: "Đã ký",
    search_button: "Tìm kiếm",
    clear_button: "Xóa lọc",
    col_patient: "Bệnh nhân",
    col_pid: "Mã BN",
    col_birth: "Ngày sinh",
    col_sex: "Giới",
    col_date: "Ngày chụp",
    col_accession: "Số phiếu",
    col_modality: "Máy",
    col_description: "Mô tả ca chụp",
    col_images: "Loạt / Ảnh",
    col_status: "Trạng thái",
    no_results: "Không tìm thấy ca chụp nào.",
    loading: "Đang tải…",
    accession_not_found: "Không có ca chụp nào với số phiếu {accession} mà bạn được xem.",
    accession_many: "Số phiếu {accession} ứng với nhiều ca chụp; chọn ca cần xem:",
    prev_page: "‹ Trước",
    next_page: "Sau ›",
    page_info: "{from}–{to} / {total}",
    sex_M: "Nam",
    sex_F: "Nữ",
    sex_O: "Khác",
    // study
    back: "‹ Danh sách",
    back_title: "Quay lại danh sách (Esc)",
    patient_id: "Mã BN",
    birth_date: "Ngày sinh",
    sex: "Giới",
    study_date: "Ngày chụp",
    accession: "Số phiếu",
    description: "Mô tả",
    series: "Loạt ảnh",
    images_count: "{n} ảnh",
    no_image: "Loạt này không có ảnh để hiển thị",
    documents: "Loạt này là tài liệu (báo cáo đã ký):",
    open_pdf: "Mở PDF",
    other_studies: "Ca chụp khác của bệnh nhân",
    media_download: "Tải về ghi đĩa/USB",
    media_download_title: "Tải ca chụp dạng DICOM (DICOMDIR) để ghi đĩa CD hoặc USB cho bệnh nhân mang đến bệnh viện khác",
    http_403: "Bạn không có quyền làm việc này",
    http_404: "Không tìm thấy",
    http_413: "Dữ liệu gửi lên quá lớn",
    http_422: "Dữ liệu không hợp lệ",
    http_429: "Quá nhiều lần thử; hãy thử lại sau",
    http_500: "Lỗi máy chủ",
    http_502: "Máy chủ tạm thời không trả lời",
    http_503: "Máy chủ đang quá tải hoặc bảo trì",
    http_504: "Máy chủ trả lời quá chậm",
    slice: "Lát cắt",
    frame: "Khung hình",
    cine_help: "Phát / dừng (phím P)",
    preset_default: "Mặc định",
    preset_brain: "Não",
    preset_lung: "Phổi",
    preset_bone: "Xương",
    preset_abdomen: "Bụng",
    window_default: "mặc định",
    zoom_in: "Phóng to (+)",
    zoom_out: "Thu nhỏ (−)",
    zoom_reset: "Vừa khung (0)",
    zoom_fit: "Vừa",
    viewer_help: "Cuộn chuột / ↑↓: lát cắt · Chuột phải hoặc Shift+kéo: cửa sổ · Ctrl+cuộn: phóng to · Kéo: di chuyển"
      + " · V / L / A / R: chọn, đo dài, đo góc, vùng ROI · Esc: hủy phép đo đang vẽ",
    measure_tools: "Công cụ đo",
    tool_pointer: "Chọn",
    tool_pointer_help: "Con trỏ: kéo để cuộn lát cắt hoặc di chuyển ảnh đã phóng to (phím V)",
    tool_length: "Đo dài",
    tool_length_help: "Đo chiều dài: kéo chuột từ điểm đầu đến điểm cuối (phím L)",
    tool_angle: "Đo góc",
    tool_angle_help: "Đo góc: bấm ba điểm, điểm thứ hai là đỉnh góc (phím A)",
    tool_roi: "ROI",
    tool_roi_help: "Vùng quan tâm hình elip: kéo chuột; trung bình, độ lệch chuẩn, nhỏ nhất, lớn nhất,"
      + " diện tích (phím R)",
    tool_clear: "Xóa",
    tool_clear_help: "Xóa các phép đo trên ảnh này (phím C; Delete: xóa phép đo cuối; Esc: hủy phép đo đang vẽ)",
    measure_uncalibrated: "(chưa hiệu chuẩn)",
    measure_detector: "(tại đầu thu)",
    measure_magnification: "(ước tính, đã hiệu chỉnh độ phóng đại)",
    measure_calibrated: "(đã hiệu chuẩn)",
    roi_mean: "TB",
    roi_sd: "ĐLC",
    roi_min: "Nhỏ nhất",
    roi_max: "Lớn nhất",
    roi_area: "Diện tích",
    roi_empty: "Không có điểm ảnh nào trong vùng",
    image_error: "Không tải được ảnh",
    // report
    report: "Báo cáo",
    findings: "Mô tả",
    impression: "Kết luận",
    save_report: "Lưu nháp",
    sign_report: "Ký duyệt",
    amend_report: "Bổ sung / sửa",
    report_pdf: "Tải PDF",
    report_none: "Chưa có báo cáo",
    report_draft: "Bản nháp",
    report_signed: "Đã ký",
    version: "Phiên bản {v}",
    signed_by: "Ký bởi {who} lúc {when}",
    updated_by: "Cập nhật bởi {who} lúc {when}",
    saved: "Đã lưu báo cáo.",
    signed_ok: "Đã ký báo cáo.",
    confirm_sign: "Ký duyệt báo cáo này? Sau khi ký, báo cáo không thể sửa (chỉ có thể bổ sung).",
    confirm_amend: "Mở phiên bản bổ sung mới cho báo cáo đã ký?",
    report_empty: "Báo cáo trống: hãy viết mô tả hoặc kết luận trước khi ký.",
    confirm_leave: "Báo cáo có thay đổi chưa lưu. Rời trang?",
    unsaved: "Chưa lưu",
    versions: "Lịch sử phiên bản",
    report_not_signed: "Báo cáo chưa được ký duyệt.",
    shortcuts_report: "Ctrl+S: lưu nháp",
    report_conflict: "Báo cáo đã được người khác thay đổi sau khi bạn mở. Nội dung hiện tại ở trên; văn bản của bạn (chưa lưu) ở khung dưới: so sánh, sao chép phần cần giữ rồi lưu lại.",
    report_restored: "Đã khôi phục văn bản báo cáo chưa lưu.",
    your_text: "Văn bản của bạn (chưa lưu)",
    network_error: "Không kết nối được máy chủ. Văn bản vẫn còn trên trang; thử lưu lại sau.",
    network_timeout: "Máy chủ không trả lời kịp (mạng chậm hoặc bị ngắt). Văn bản vẫn còn trên trang; thử lại sau.",
    // report templates
    templates: "Mẫu kết quả",
    template_search_ph: "Tìm mẫu, vd: sieu am bung",
    template_none: "Không có mẫu nào phù hợp.",
    template_load_error: "Không tải được danh sách mẫu",
    template_mine: "Của tôi",
    template_shared: "Của khoa",
    template_replace_confirm: "Thay văn bản đã nhập bằng mẫu “{name}”? Phần đã nhập sẽ bị thay thế.",
    template_applied: "Đã điền theo mẫu “{name}”.",
    save_template: "Lưu làm mẫu của tôi",
    template_name_prompt: "Tên mẫu mới (lưu nội dung mô tả và kết luận hiện tại):",
    template_saved: "Đã lưu mẫu “{name}”.",
    template_replaced: "Đã cập nhật mẫu “{name}”.",
    template_overwrite_confirm: "Bạn đã có mẫu tên “{name}”. Thay nội dung mẫu đó bằng văn bản hiện tại?",
    template_empty: "Chưa có nội dung để lưu làm mẫu.",
  },
  en: {
    app_title: "Filmless PACS",
    nav_worklist: "Worklist",
    logout: "Log out",
    lang_toggle: "VI",
    lang_toggle_title: "Chuyển sang tiếng Việt",
    login_title: "Sign in",
    username: "Username",
    password: "Password",
    login_button: "Sign in",
    login_failed: "Sign-in failed",
    wrong_credentials: "wrong username or password",
    session_expired: "Your session has expired, please sign in again.",
    search_name: "Patient name",
    search_name_ph: "e.g. nguyen van an",
    search_pid: "Patient ID",
    dates_reversed: "The start date is after the end date: swap them.",
    date_from: "From",
    date_to: "To",
    modality: "Modality",
    report_status: "Report status",
    all: "All",
    status_unread: "Unread",
    status_none: "Unread",
    status_draft: "Draft",
    status_signed: "Signed",
    search_button: "Search",
    clear_button: "Clear",
    col_patient: "Patient",
    col_pid: "Patient ID",
    col_birth: "Birth date",
    col_sex: "Sex",
    col_date: "Study date",
    col_accession: "Accession",
    col_modality: "Mod.",
    col_description: "Description",
    col_images: "Series / Img",
    col_status: "Status",
    no_results: "No studies found.",
    loading: "Loading…",
    accession_not_found: "No study with accession number {accession} that you may see.",
    accession_many: "Accession number {accession} belongs to several studies; choose one:",
    prev_page: "‹ Prev",
    next_page: "Next ›",
    page_info: "{from}–{to} of {total}",
    sex_M: "Male",
    sex_F: "Female",
    sex_O: "Other",
    back: "‹ Worklist",
    back_title: "Back to the worklist (Esc)",
    patient_id: "ID",
    birth_date: "Born",
    sex: "Sex",
    study_date: "Study date",
    accession: "Accession",
    description: "Description",
    series: "Series",
    images_count: "{n} img",
    no_image: "This series has no image to display",
    documents: "This series holds documents (signed reports):",
    open_pdf: "Open PDF",
    other_studies: "The patient's other studies",
    media_download: "Download for CD/USB",
    media_download_title: "Download the study as DICOM media (DICOMDIR) to burn on a CD or copy to a USB stick for the patient to take to another hospital",
    http_403: "You may not do this",
    http_404: "Not found",
    http_413: "What was sent is too large",
    http_422: "The data is not valid",
    http_429: "Too many attempts; try again later",
    http_500: "Server error",
    http_502: "The server is not answering",
    http_503: "The server is overloaded or in maintenance",
    http_504: "The server answered too slowly",
    slice: "Slice",
    frame: "Frame",
    cine_help: "Play / pause (key P)",
    preset_default: "Default",
    preset_brain: "Brain",
    preset_lung: "Lung",
    preset_bone: "Bone",
    preset_abdomen: "Abdomen",
    window_default: "default",
    zoom_in: "Zoom in (+)",
    zoom_out: "Zoom out (−)",
    zoom_reset: "Fit to window (0)",
    zoom_fit: "Fit",
    viewer_help: "Wheel / ↑↓: slices · Right or Shift+drag: window · Ctrl+wheel: zoom · Drag: pan"
      + " · V / L / A / R: pointer, length, angle, ROI · Esc: cancel the measurement being drawn",
    measure_tools: "Measurement tools",
    tool_pointer: "Pointer",
    tool_pointer_help: "Pointer: drag to scroll slices or to pan a zoomed image (key V)",
    tool_length: "Length",
    tool_length_help: "Length: drag from one end to the other (key L)",
    tool_angle: "Angle",
    tool_angle_help: "Angle: click three points, the second is the vertex (key A)",
    tool_roi: "ROI",
    tool_roi_help: "Elliptical region of interest: drag; mean, SD, min, max, area (key R)",
    tool_clear: "Clear",
    tool_clear_help: "Clear the measurements on this image (key C; Delete: remove the last one;"
      + " Esc: cancel the one being drawn)",
    measure_uncalibrated: "(uncalibrated)",
    measure_detector: "(at detector)",
    measure_magnification: "(estimated, magnification corrected)",
    measure_calibrated: "(calibrated)",
    roi_mean: "Mean",
    roi_sd: "SD",
    roi_min: "Min",
    roi_max: "Max",
    roi_area: "Area",
    roi_empty: "No pixel in the region",
    image_error: "Could not load the image",
    report: "Report",
    findings: "Findings",
    impression: "Impression",
    save_report: "Save draft",
    sign_report: "Sign",
    amend_report: "Amend",
    report_pdf: "PDF",
    report_none: "No report",
    report_draft: "Draft",
    report_signed: "Signed",
    version: "Version {v}",
    signed_by: "Signed by {who} at {when}",
    updated_by: "Updated by {who} at {when}",
    saved: "Report saved.",
    signed_ok: "Report signed.",
    confirm_sign: "Sign this report? A signed report cannot be edited (only amended).",
    confirm_amend: "Open a new amendment version of the signed report?",
    report_empty: "The report is empty: write findings or an impression before signing.",
    confirm_leave: "The report has unsaved changes. Leave this page?",
    unsaved: "Unsaved",
    versions: "Version history",
    report_not_signed: "The report has not been signed yet.",
    shortcuts_report: "Ctrl+S: save draft",
    report_conflict: "Someone else changed this report after you opened it. What it says now is above; your unsaved text is in the box below: compare, copy what to keep, and save again.",
    report_restored: "Your unsaved report text was restored.",
    your_text: "Your text (not saved)",
    network_error: "The server cannot be reached. Your text is still on the page; try saving again later.",
    network_timeout: "The server did not answer in time (slow or dropped link). Your text is still on the page; try again later.",
    templates: "Report templates",
    template_search_ph: "Search, e.g. chest",
    template_none: "No matching template.",
    template_load_error: "Could not load the templates",
    template_mine: "Mine",
    template_shared: "Department",
    template_replace_confirm: "Replace the text you typed with the template “{name}”? Your typed text will be replaced.",
    template_applied: "Filled from the template “{name}”.",
    save_template: "Save as my template",
    template_name_prompt: "Name of the new template (the current findings and impression are saved):",
    template_saved: "Template “{name}” saved.",
    template_replaced: "Template “{name}” updated.",
    template_overwrite_confirm: "You already have a template named “{name}”. Replace its text with the current text?",
    template_empty: "There is no text to save as a template.",
  },
};

const listeners = new Set();

function stored() {
  try {
    return localStorage.getItem(STORAGE_KEY);
  } catch {
    return null;
  }
}

let lang = LABELS[stored()] ? stored() : "vi";

export function getLang() {
  return lang;
}

export function setLang(next) {
  if (!LABELS[next] || next === lang) return;
  lang = next;
  try {
    localStorage.setItem(STORAGE_KEY, next);
  } catch {
    /* private mode: the choice lasts for this page only */
  }
  document.documentElement.lang = next;
  applyI18n(document);
  for (const fn of listeners) fn(next);
}

export function toggleLang() {
  setLang(lang === "vi" ? "en" : "vi");
}

/** The label `key` in the current language, with {name} placeholders filled. */
export function t(key, params) {
  let text = LABELS[lang][key] ?? LABELS.vi[key] ?? key;
  if (params) {
    for (const [name, value] of Object.entries(params)) {
      text = text.split(`{${name}}`).join(String(value));
    }
  }
  return text;
}

/** Fill every data-i18n* attribute under `root`. */
export function applyI18n(root) {
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of root.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  for (const el of root.querySelectorAll("[data-i18n-aria]")) el.setAttribute("aria-label", t(el.dataset.i18nAria));
}

/** Call `fn(lang)` after every language switch; returns an unsubscribe function. */
export function onLangChange(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

document.documentElement.lang = lang;
