# imgstream worker / sink image. CPU by default; for CUDA build FROM an nvidia/cuda runtime
# base with a matching torch wheel (see README "Production").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

RUN pip install torch==2.14.1 torchvision==0.29.1 \
 && pip install --no-deps facenet-pytorch
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY analysis ./analysis
COPY consumer ./consumer
COPY producer ./producer
COPY trained_classifiers ./trained_classifiers
RUN pip install '.[worker,sink]'

# Pretrained weights are downloaded once into these caches; mount a volume to keep them.
ENV HF_HOME=/cache/huggingface TORCH_HOME=/cache/torch XDG_CACHE_HOME=/cache
RUN useradd --create-home --uid 10001 imgstream && mkdir -p /cache /blobs && chown imgstream /cache /blobs
USER imgstream

ENTRYPOINT ["imgstream"]
CMD ["worker"]
