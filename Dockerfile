# imgstream images, one stage each (docs/DEPLOY.md "Images"):
#   worker (the default target): the worker, and every other command. CPU torch by default;
#       --build-arg TORCH_VARIANT=cu130 installs the CUDA torch wheel, which carries its own CUDA
#       libraries: the host needs only the NVIDIA driver and the NVIDIA container toolkit.
#   slim (--target slim): producers (submit, replay, topics) and the sink, without torch.
# Python dependencies are pinned in deploy/requirements-*.txt (scripts/lock_image_requirements.py).

FROM python:3.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The HTTP ports (worker and sink) bind loopback by default; a container's loopback is its own, so
# Prometheus and probes from outside need every interface (docs/DEPLOY.md "The compose stack").
ENV IMGSTREAM_HTTP_HOST=0.0.0.0 IMGSTREAM_SINK__HTTP_HOST=0.0.0.0
RUN useradd --create-home --uid 10001 --user-group imgstream \
 && mkdir -p /app /blobs /cache \
 && chown imgstream:imgstream /blobs /cache
WORKDIR /app

# The project as a wheel: every package pyproject.toml lists, nothing else (.dockerignore keeps the rest out).
FROM base AS wheel
COPY . /src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src

FROM base AS slim
COPY deploy/requirements-slim.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --no-deps --requirement /tmp/requirements.txt \
 && pip check \
 && rm /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
USER 10001
ENTRYPOINT ["imgstream"]
CMD ["--help"]

FROM base AS worker
# cpu, or a CUDA build such as cu130 (the CUDA version the torch wheel was built for).
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
COPY deploy/requirements-worker.txt /tmp/requirements.txt
# facenet-pytorch pins an old torch: it goes in without its dependencies (requests is in the file).
RUN pip install --no-cache-dir --no-deps --requirement /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps facenet-pytorch==2.6.0 \
 && rm /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
COPY trained_classifiers ./trained_classifiers
# Pretrained weights are downloaded once into /cache: mount a volume there to keep them.
ENV HF_HOME=/cache/huggingface TORCH_HOME=/cache/torch XDG_CACHE_HOME=/cache
USER 10001
ENTRYPOINT ["imgstream"]
CMD ["worker", "--http-port", "8080"]
