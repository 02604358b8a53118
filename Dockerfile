# syntax=docker/dockerfile:1
#
# gan-job: one image for CPU and NVIDIA GPUs.
#
# torch's PyPI wheels bundle the CUDA 13 runtime (cuDNN, NCCL, cuBLAS...), so the image needs no
# CUDA base: the GPU host needs only an NVIDIA driver that supports CUDA 13.0 (R580 or newer) and
# the NVIDIA container toolkit (docker run --gpus all) or the device plugin (Kubernetes).
# Without a GPU the same image trains on CPU.
#
#   docker build -t gan-job .                              # with InceptionV3 weights for FID
#   docker build --build-arg FETCH_INCEPTION=0 -t gan-job .  # without (offline FID extractor)

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# The runtime requirements are requirements.lock (every package pinned, with its hashes; the
# tensorboard extra included, for GAN_TENSORBOARD=true), once checked to hold pyproject.toml's
# pins. Only the lock leaves this stage, so a change elsewhere in pyproject.toml (a dev tool's
# pin, the version) leaves the 5.9 GB install below cached.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['tensorboard']))" > pins.txt \
 && while read -r pin; do \
      grep -q "^$pin " requirements.lock \
      || { echo "requirements.lock lacks $pin: update it (docs/container.md)" >&2; exit 1; }; \
    done < pins.txt

# Third-party dependencies only: this layer is rebuilt when the lock changes, not when job/ does.
# pip.conf is an optional build secret (a private index; docker build --secret
# id=pip.conf,src=...): mounted for the step, never stored in a layer. Without it, PyPI.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY --from=requirements /src/requirements.lock ./
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    pip install --no-cache-dir --require-hashes -r requirements.lock

# torchvision's ImageNet InceptionV3 (what torcheval's FID loads), put where torch hub looks
# first, so that FID works on clusters without internet. check_hash verifies the sha256 prefix
# in the file name.
FROM deps AS weights
ARG FETCH_INCEPTION=1
ENV TORCH_HOME=/opt/torch
RUN mkdir -p "$TORCH_HOME/hub/checkpoints" \
 && if [ "$FETCH_INCEPTION" = "1" ]; then \
      python -c "from torchvision.models import Inception_V3_Weights as W; W.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)" \
      && test -s "$TORCH_HOME/hub/checkpoints/inception_v3_google-0cc3c7bd.pth"; \
    fi

# The job itself, as a wheel (no editable install, no source tree in the image).
FROM deps AS wheel
COPY pyproject.toml README.md ./
COPY job/ job/
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="gan-job" \
      org.opencontainers.image.description="Trains GANs on one GPU, many GPUs or many nodes; settings from GAN_* variables"
# tini as PID 1: it passes SIGTERM on to gan-job (PID 1 ignores signals it has no handler for,
# and Kubernetes has no `docker run --init`) and reaps the zombies of exited DataLoader workers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/*
# --no-log-init: a high UID would otherwise grow /var/log/lastlog to gigabytes
RUN groupadd --gid 10001 gan \
 && useradd --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/gan gan \
 && mkdir -p /work/data /work/runs \
 && chown -R 10001:10001 /work
COPY --from=deps /opt/venv /opt/venv
COPY --from=weights /opt/torch /opt/torch
# Copied, not bind-mounted from the stage: podman's and buildah's layer cache would keep the old
# wheel under a bind mount (buildah issue 4522).
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/wheels/*.whl \
 && rm -r /tmp/wheels

# Relative defaults (GAN_DATA_DIR=./data, GAN_ARTIFACT_URI=./runs) land in /work. HOME must be
# writable (matplotlib, CUDA caches); Kubernetes mounts emptyDirs on /work, /home/gan and /tmp
# because the root filesystem is read-only there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/gan \
    TORCH_HOME=/opt/torch
WORKDIR /work
USER 10001:10001
EXPOSE 9090
# -s: reaps as a subreaper too when it is not PID 1 (docker run --init, compose init: true)
ENTRYPOINT ["tini", "-s", "--", "gan-job"]
