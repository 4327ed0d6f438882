# One image for the demo app, the upstream simulator and the load generator
# (docker-compose.yml picks the command). Build from the repository root:
#   docker build -t loopwatch-demo .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The library with the demo's dependencies (FastAPI, uvicorn, httpx, ...). Copied before the demo
# so that editing the demo does not reinstall the dependencies.
COPY pyproject.toml README.md ./
COPY loopwatch ./loopwatch
RUN pip install ".[demo]"

# The demo package runs from the working directory: `python -m demo_app ...`.
COPY demo_app ./demo_app

RUN useradd --system --no-create-home --uid 10001 loopwatch
USER loopwatch

EXPOSE 8000 8001
CMD ["python", "-m", "demo_app", "--host", "0.0.0.0", "--port", "8000"]
