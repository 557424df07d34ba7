# The rabbitq image: `docker run IMAGE consume demo --app examples.demo_app:app` runs a
# consumer, `docker run IMAGE topology apply` declares the topology, `docker run -e
# RABBITQ_CONSOLE_TOKEN=... -p 8800:8800 IMAGE console --host 0.0.0.0` serves the web console.
# Built by docker-compose.yml for its topology, worker, console and feeder services.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package first, so editing the examples or the topology does not reinstall it; with the
# console extra (Starlette, uvicorn, Jinja2) for `rabbitq console`.
COPY pyproject.toml README.md ./
COPY rabbitq/ rabbitq/
RUN pip install '.[console]'

COPY topology/ topology/
COPY examples/ examples/

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin rabbitq
USER rabbitq

# `--app examples.demo_app:app` imports from the working directory.
ENV RABBITQ_TOPOLOGY=/app/topology
ENTRYPOINT ["rabbitq"]
CMD ["--help"]
