# The example shop (examples/shop) with the stickyproxy package it imports.
# Built from the repository root: docker build -f examples/Dockerfile.app .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stickyproxy ./stickyproxy
RUN pip install . && rm -rf /src

COPY examples/shop /app/shop
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin shop

USER shop
WORKDIR /app
EXPOSE 9000
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "shop"]
CMD ["--host", "0.0.0.0", "--port", "9000", "--node-id", "app", "--redis", "redis://redis:6379/0"]
