# Shared by the set-up scripts: install Debian packages and the Python venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# apt_need PACKAGE... : install the Debian packages that are not installed yet.
apt_need() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# python_ok: a Python >= 3.11 with venv support.
python_ok() {
    command -v python3 >/dev/null && python3 - <<'PY' 2>/dev/null
import sys, venv, ensurepip  # noqa: F401
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
}

# venv_install EXTRAS : create .venv and install the project (".[test]" etc.).
venv_install() {
    python_ok || apt_need python3 python3-venv python3-pip
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v -i "warning" || true
    "$VENV/bin/python" -m pip install -q -e "$ROOT$1" 2>&1 | grep -v -i "warning\|location" || true
    "$VENV/bin/python" -c "import pacs, dicom_scp, viewer_api, storage" \
        || { echo "python install failed" >&2; exit 1; }
}
