#!/usr/bin/env bash
# Install and start the appliance on the embedded default (SQLite + files in ./data).
# On first start an empty archive is filled with synthetic sample studies.
source "$(dirname "$0")/lib.sh"
apt_need fonts-dejavu-core
venv_install ""
cd "$ROOT"
echo "starting filmless-pacs: DICOM FILMLESS@127.0.0.1:${PACS_DICOM_PORT:-11112}, HTTP http://127.0.0.1:${PACS_HTTP_PORT:-8042}"
exec "$VENV/bin/pacs" serve --data-dir "${PACS_DATA_DIR:-$ROOT/data}" --with-samples "$@"
