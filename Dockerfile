# filmless-pacs appliance image: DICOM 11112, HTTP 8042, HL7 2575, data in /data.
FROM python:3.11-slim

# DCMTK for operators (echoscu, storescu, findscu...); DejaVu for report PDFs;
# tzdata so TZ (the hospital's zone, e.g. Asia/Ho_Chi_Minh) is honoured;
# pg_dump and pg_restore for `pacs backup` / `pacs restore` of a PostgreSQL
# index, of the server's major version (docker-compose.yml: postgres:16) or
# newer: pg_dump refuses a newer server, and the base image's Debian has 15.
# They come from the PostgreSQL project's repository (apt.postgresql.org),
# set up by Debian's postgresql-common with the key it ships.
ARG PG_CLIENT_VERSION=16
RUN apt-get update \
    && apt-get install -y --no-install-recommends dcmtk fonts-dejavu-core tzdata postgresql-common \
    && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y \
    && apt-get install -y --no-install-recommends postgresql-client-${PG_CLIENT_VERSION} \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --system --create-home --uid 1000 pacs \
    && mkdir -p /data && chown pacs:pacs /data

WORKDIR /opt/filmless-pacs
COPY pyproject.toml README.md ./
COPY storage ./storage
COPY pacs ./pacs
COPY dicom_scp ./dicom_scp
COPY worklist ./worklist
COPY ris_bridge ./ris_bridge
COPY viewer_api ./viewer_api
COPY sample_studies ./sample_studies
# Import every module, so a dependency missing from pyproject.toml fails the
# build rather than the first start.
RUN pip install --no-cache-dir . && python -c "import importlib, pkgutil; \
[importlib.import_module(m.name) for p in ('storage', 'pacs', 'dicom_scp', 'worklist', 'ris_bridge', 'viewer_api', 'sample_studies') \
 for m in pkgutil.walk_packages(importlib.import_module(p).__path__, p + '.') \
 if '.migrations' not in m.name and not m.name.endswith('__main__')]"

USER pacs
VOLUME ["/data"]
# Inside a container the listeners must accept connections from outside it.
# So only registered calling AEs may associate (open to the network, DICOM
# would let anyone query and retrieve every patient): register each modality
# and workstation once, e.g. `docker exec CONTAINER pacs ae add CT_ROOM1
# --host 10.0.0.21 --port 104` (read at once by the running server); add
# -e PACS_AE_CHECK_HOST=true when the modalities' addresses reach the
# container unchanged (not behind NAT or a TCP balancer).
# A container's clock is UTC: PACS_TIMEZONE is the hospital's zone (DICOM and
# HL7 times written, FHIR times, "today"); override it with -e for another.
ENV PACS_DATA_DIR=/data \
    PACS_HOST=0.0.0.0 \
    PACS_AE_ALLOWLIST=true \
    PACS_TIMEZONE=Asia/Ho_Chi_Minh
EXPOSE 11112 8042 2575
# `pacs health` asks /health where the settings say the server listens
# (PACS_HTTP_PORT, PACS_HTTP_TLS), not a fixed http://127.0.0.1:8042.
HEALTHCHECK --interval=30s --timeout=5s CMD ["pacs", "health", "--quiet"]
CMD ["pacs", "serve"]
