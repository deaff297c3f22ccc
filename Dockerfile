# One image for every optinfer service (chain, deploy job, provider, API, watchtower workers).
# The project-local Node tools (solc-js, anvil) from the committed lock file, and optinfer
# installed as a plain package without the `convert` extra: every service here runs the
# integer model and none needs torch or transformers (converting a model is done beside it,
# with `pip install torch==2.13.0 'optinfer[convert]'`).
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY contracts/toolchain/package.json contracts/toolchain/package-lock.json .tools/
RUN cd .tools && npm ci --no-audit --no-fund --loglevel=error

COPY . .
RUN pip install --no-cache-dir .

# The installed package finds anvil and solc-js here, not beside its own files.
ENV OPTINFER_TOOLS_DIR=/app/.tools

ENV OPTINFER_STATE_DIR=/var/lib/optinfer
