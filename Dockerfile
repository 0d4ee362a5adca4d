# One image for every Cirrus process: the Nameko services, the gRPC gateway,
# the driver workers (libvirt's embedded test:///default driver) and the CLI.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# build deps of libvirt-python and psycopg2; libvirt0 and libpq5 come with them
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libvirt-dev libpq-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cirrus
# The dependencies first, in their own layer, so a code change does not reinstall them.
COPY pyproject.toml .
RUN mkdir cirrus services && pip install . && pip uninstall -y cirrus && rmdir cirrus services

COPY . .
# Editable, because the code finds deploy/cirrus.yaml and proto/ beside its source
# tree; the stubs are generated from proto/ into that tree.
RUN pip install --no-deps -e . && python -m cirrus.protogen

CMD ["cirrus", "--help"]
