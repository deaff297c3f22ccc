# One image for every optinfer service (chain, deploy job, provider, API, watchtower workers).
# The same two installs as the README's set-up: Python packages (torch pinned to the CPU
# build first) and the project-local Node tools (solc-js, anvil) from the committed lock file.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY contracts/toolchain/package.json contracts/toolchain/package-lock.json .tools/
RUN cd .tools && npm ci --no-audit --no-fund --loglevel=error

COPY . .
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -e .

ENV OPTINFER_STATE_DIR=/var/lib/optinfer
