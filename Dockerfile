# spendstream worker image: `spendstream up` against an external Kafka and ClickHouse.
#
#   docker build -t spendstream .
#   docker run --rm spendstream --help
#
# With SPENDSTREAM_BOOTSTRAP_SERVERS set, `up` starts no local broker (no Java or Maven needed
# in the image); it creates the topics, applies the ClickHouse DDL and runs the Faust worker in
# the foreground. See docker-compose.yml and deploy/compose/README.md.

# 0. The meter's native decoder (stream_processors/native, Rust + PyO3) as one abi3 wheel (any
#    CPython >= 3.11), built on bookworm's glibc (2.36, not newer than the final image's). Without
#    it the meter would decode with fastavro (same results, ~40x the CPU for decoding).
#    NOTE: written where no Docker engine was available: this stage has not been run yet.
FROM rust:1-slim-bookworm AS native
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/maturin && /opt/maturin/bin/pip install -q -c /tmp/constraints.txt maturin
WORKDIR /native
COPY stream_processors/native/Cargo.toml stream_processors/native/Cargo.lock stream_processors/native/pyproject.toml ./
COPY stream_processors/native/src/ src/
RUN /opt/maturin/bin/maturin build --release --locked -o /wheels

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

# 1b. The native decoder, the wheel of stage 0 (step 2 checks that the meter finds it).
COPY --from=native /wheels/ /tmp/wheels/
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels \
    && python -c "import spendstream_native"

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
    && python -c "from stream_processors.usage_columns import NATIVE; assert NATIVE, 'no native decoder'" \
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
