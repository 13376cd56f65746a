# spendstream worker image: `spendstream up` against an external Kafka and ClickHouse.
#
#   docker build -t spendstream .
#   docker run --rm spendstream --help
#
# With SPENDSTREAM_BOOTSTRAP_SERVERS set, `up` starts no local broker (no Java or Maven needed
# in the image); it creates the topics, applies the ClickHouse DDL and runs the Faust worker in
# the foreground. See docker-compose.yml and deploy/compose/README.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Every dependency has a manylinux x86_64 wheel. On arm64, faust-streaming 0.15.3 ships only an
# sdist: it builds as pure Python when no C compiler is present (slower, same behaviour).

# 1. Dependencies alone, from pyproject.toml, so that editing the source does not reinstall them.
COPY pyproject.toml constraints.txt /tmp/build/
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/build/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" \
        > /tmp/build/requirements.txt \
    && pip install -r /tmp/build/requirements.txt -c /tmp/build/constraints.txt \
    && rm -rf /tmp/build

# 2. The project. hatchling needs README.md (the readme) and force-includes schemas/, sql/ and
#    deploy/kafka/ into the wheel as spendstream/_contracts/.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY spendstream/ spendstream/
COPY producers/ producers/
COPY stream_processors/ stream_processors/
COPY schemas/ schemas/
COPY sql/ sql/
COPY deploy/kafka/ deploy/kafka/
RUN pip install --no-deps . \
    && spendstream --help >/dev/null \
    && cd / && rm -rf /src

# 3. Non-root user owning the state dir (the worker's table data; Kafka jars only if the image is
#    ever run without SPENDSTREAM_BOOTSTRAP_SERVERS, which would need a JRE it does not have).
RUN groupadd --system --gid 10001 spendstream \
    && useradd --system --uid 10001 --gid spendstream --home-dir /home/spendstream --create-home \
        --shell /usr/sbin/nologin spendstream \
    && mkdir -p /var/lib/spendstream \
    && chown spendstream:spendstream /var/lib/spendstream

ENV SPENDSTREAM_STATE_DIR=/var/lib/spendstream
WORKDIR /var/lib/spendstream
VOLUME ["/var/lib/spendstream"]
USER spendstream

# Worker web server: /health and /sql (used by `spendstream sql`). NOTE: the worker binds
# 127.0.0.1 (stream_processors/app.py, web_bind), so inside the container the port serves the
# container's own healthcheck and `docker compose exec worker spendstream sql ...`; publishing it
# to the host needs a bind setting (0.0.0.0) that the app does not have yet.
EXPOSE 6066
# The gateway (`spendstream gateway`, SPENDSTREAM_GATEWAY_HOST=0.0.0.0 in docker-compose.yml).
EXPOSE 4000

ENTRYPOINT ["spendstream"]
CMD ["up"]
