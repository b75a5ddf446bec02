#!/usr/bin/env bash
# Install filmless-pacs as a systemd service on this machine: it starts at boot,
# is restarted after a crash and logs to the journal.
#   bash scripts/install-service.sh [DATA_DIR]     (default /var/lib/filmless-pacs)
#   bash scripts/install-service.sh --print [DATA_DIR]   only print the unit
# Settings go in /etc/filmless-pacs.env (PACS_HOST, ports, index/storage URLs...).
source "$(dirname "$0")/lib.sh"
PRINT=0
if [ "${1:-}" = "--print" ]; then PRINT=1; shift; fi
DATA_DIR="$(realpath -m "${1:-/var/lib/filmless-pacs}")"
case "$DATA_DIR" in *[[:space:]]*) echo "choose a data directory without spaces: $DATA_DIR" >&2; exit 2;; esac
SERVICE_USER="${PACS_SERVICE_USER:-pacs}"
ENV_FILE="${PACS_ENV_FILE:-/etc/filmless-pacs.env}"
UNIT="${PACS_UNIT_DIR:-/etc/systemd/system}/filmless-pacs.service"

unit() {
    sed -e "s|@ROOT@|$ROOT|g" -e "s|@DATA_DIR@|$DATA_DIR|g" -e "s|@ENV_FILE@|$ENV_FILE|g" \
        -e "s|@USER@|$SERVICE_USER|g" "$ROOT/deploy/filmless-pacs.service"
}
if [ "$PRINT" = 1 ]; then unit; exit 0; fi

apt_need fonts-dejavu-core
venv_install ""
id "$SERVICE_USER" >/dev/null 2>&1 \
    || as_root useradd --system --home-dir "$DATA_DIR" --shell /usr/sbin/nologin "$SERVICE_USER"
if ! as_root runuser -u "$SERVICE_USER" -- test -x "$VENV/bin/pacs"; then
    echo "user $SERVICE_USER cannot run $VENV/bin/pacs (a clone under /root or a private home?):" \
         "clone the repository into /opt/filmless-pacs and run this script from there" >&2
    exit 1
fi
as_root mkdir -p "$DATA_DIR"
as_root chown "$SERVICE_USER:$SERVICE_USER" "$DATA_DIR"
as_root chmod 750 "$DATA_DIR"
if [ ! -e "$ENV_FILE" ]; then
    as_root tee "$ENV_FILE" >/dev/null <<ENV
# filmless-pacs settings (README, "Configuration"); restart after a change:
#   systemctl restart filmless-pacs
PACS_HOST=127.0.0.1
PACS_AE_TITLE=FILMLESS
# The hospital's time zone (DICOM/HL7 times written, FHIR times, "today"): an IANA name.
PACS_TIMEZONE=Asia/Ho_Chi_Minh
#PACS_INDEX_URL=postgresql+psycopg://pacs@127.0.0.1/pacs
#PACS_STORAGE_URL=s3://pacs?endpoint=127.0.0.1:9000&secure=false
#PACS_S3_ACCESS_KEY=
#PACS_S3_SECRET_KEY=
ENV
    as_root chown "root:$SERVICE_USER" "$ENV_FILE"
    as_root chmod 640 "$ENV_FILE"
fi
unit | as_root tee "$UNIT" >/dev/null
as_root systemctl daemon-reload
as_root systemctl enable --now filmless-pacs
echo "filmless-pacs runs as a service (data in $DATA_DIR, settings in $ENV_FILE)."
echo "first start: journalctl -u filmless-pacs | grep password   (the admin password)"
