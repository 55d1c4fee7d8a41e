# syntax=docker/dockerfile:1
# The mcpr relay as a container image (non-root, no build tools at run time):
#
#   docker build -t mcpr-relay .
#   docker run -p 8080:8080 mcpr-relay --domain tunnel.example.com
#   docker run -p 8080:8080 mcpr-relay --relay --port 8080 --relay-domain tunnel.example.com
#   docker run -p 443:8443 -v /srv/mcpr/relay.toml:/etc/mcpr/relay.toml:ro \
#       -v /srv/mcpr/certs:/etc/mcpr/certs:ro mcpr-relay
#
# Arguments after the image name are `twist mcpr-relay` options.  A config file
# mounted at /etc/mcpr/relay.toml is read without --config; the environment
# variables MCPR_AUTH_PROVIDER and MCPR_AUTH_PROVIDER_SECRET are read too.
# scripts/check-dockerfile runs every step of this file by hand (no Docker).
#
# Python 3.11, as on Debian 12 and in the test suite that requirements.lock comes from.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements.lock setup.cfg pyproject.toml README.md ./
COPY mcpr/ mcpr/
COPY twisted/ twisted/
# Pinned dependencies, then mcpr itself, into a venv that the runtime stage
# copies whole; `pip check` proves the lock is complete.
RUN python -m venv /opt/mcpr \
 && /opt/mcpr/bin/pip install --no-deps --only-binary=:all: -r requirements.lock \
 && /opt/mcpr/bin/pip install --no-deps . \
 && /opt/mcpr/bin/pip check \
 && /opt/mcpr/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/mcpr /opt/mcpr
# Twisted's plugin cache, written now: the service user cannot write
# site-packages, and would otherwise rescan (and warn) on every start.
# /srv/mcpr/mcpr.toml points at /etc/mcpr/relay.toml, which the relay then
# finds (as ./mcpr.toml) whenever a config file is mounted there.
# /var/lib/mcpr holds the name reservations (MCPR_STATE_DIR), a volume so that
# they outlive the container: `-v mcpr-state:/var/lib/mcpr`.
RUN /opt/mcpr/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && /opt/mcpr/bin/python -m compileall -q /opt/mcpr/lib \
 && mkdir -p /etc/mcpr/certs /srv/mcpr \
 && ln -s /etc/mcpr/relay.toml /srv/mcpr/mcpr.toml \
 && install -d -m 0700 -o 10001 -g 10001 /var/lib/mcpr
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /srv/mcpr --shell /usr/sbin/nologin mcpr
ENV PATH=/opt/mcpr/bin:$PATH PYTHONUNBUFFERED=1 MCPR_HEALTHCHECK_URL=http://127.0.0.1:8080/healthz \
    MCPR_STATE_DIR=/var/lib/mcpr
VOLUME ["/var/lib/mcpr"]
WORKDIR /srv/mcpr
USER 10001:10001
EXPOSE 8080
# The slim image has no curl.  With only a TLS listener, also listen on
# tcp:8080:interface=127.0.0.1 or point MCPR_HEALTHCHECK_URL elsewhere.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['MCPR_HEALTHCHECK_URL'], timeout=4)"]
# SIGTERM drains (up to drain_timeout, default 30 s): `docker stop -t 45`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["twist", "--log-format=text", "mcpr-relay"]
