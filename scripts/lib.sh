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
    # pip's own status: grep's (1 when pip printed nothing) is not an error,
    # but a failed install was, and install-service.sh went on to enable a
    # service that could not start (or ran the previous install's code).
    local pip_status=0
    "$VENV/bin/python" -m pip install -q -e "$ROOT$1" 2>&1 | grep -v -i "warning\|location" \
        || pip_status=${PIPESTATUS[0]}
    if [ "$pip_status" -ne 0 ]; then
        echo "python install failed: pip install -e $ROOT$1 exited $pip_status" >&2
        exit 1
    fi
    "$VENV/bin/python" -c "import storage, pacs, pacs.cli, dicom_scp, worklist, ris_bridge, viewer_api, sample_studies" \
        || { echo "python install failed: a module does not import" >&2; exit 1; }
}
