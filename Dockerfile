# syntax=docker/dockerfile:1
# Label Studio ML backend, CPU only. One image, two roles (see docker-compose.yml):
#   API:    gunicorn -c gunicorn.conf.py backend.web.wsgi:app              (the default CMD)
#   worker: rq worker --url "$REDIS_URL" --with-scheduler training prelabel   (with OMP_WAIT_POLICY=PASSIVE)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# No system packages: the one OpenCV is opencv-python-headless (no libGL, no GLib; see below).

WORKDIR /app

# Dependencies first, so code changes do not reinstall them. Only the runtime lock (requirements.txt):
# tests, lint and fuzzing live in requirements-dev.txt, which the image never installs. The optional
# OWL-ViT/SAM source (transformers) is requirements-owlvit.txt, added with
# `docker compose build --build-arg WITH_OWLVIT=true`. The lock pins the CUDA build of torch and its
# nvidia-*/cuda-*/triton wheels (several GB): install the CPU build of the same torch/torchvision
# versions, then the rest of the lock without those lines and without the `-r` include (nvidia-ml-py
# stays: Ultralytics requires it, and it is a small pure-Python package). Everything with --no-deps,
# as make install does: the lock pins the whole tree, and leaves out Ultralytics' opencv-python (GUI
# OpenCV, needs libGL) in favour of opencv-python-headless (same cv2); scripts/check_env.py then
# checks that nothing is missing and that cv2 is the headless build.
ARG WITH_OWLVIT=false
COPY requirements.txt requirements-owlvit.txt ./
COPY scripts/check_env.py /tmp/check_env.py
RUN pip install --no-deps torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu \
 && if [ "$WITH_OWLVIT" = true ]; then extra=requirements-owlvit.txt; else extra=; fi \
 && cat requirements.txt $extra \
  | grep -vE '^(-r |(torch|torchvision|triton|cuda-(bindings|pathfinder|toolkit)|nvidia-(cu|nccl|nvjitlink|nvshmem|nvtx)[a-z0-9-]*)==)' \
        > /tmp/requirements-cpu.txt \
 && pip install --no-deps -r /tmp/requirements-cpu.txt \
 && python -c "import torch; assert torch.version.cuda is None, torch.version.cuda" \
 && python /tmp/check_env.py \
 && rm /tmp/requirements-cpu.txt /tmp/check_env.py

# A non-root user; it owns only what the service writes.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app \
 && mkdir -p /data/models /data/cache /app/var/ultralytics \
 && chown -R app:app /data /app/var

COPY pyproject.toml ./
COPY backend/ backend/
COPY worker/ worker/
COPY scripts/ scripts/
COPY gunicorn.conf.py label_config.xml ./
# The `lsb` command (pyproject.toml's entry point, on PATH in both roles); its dependencies are the
# lock installed above.
RUN pip install --no-deps . \
 && rm -rf build ./*.egg-info

# Ultralytics never touches the network (docs/ultralytics.md#no-network); state lives on /data volumes.
ENV PYTHONPATH=/app \
    PORT=9090 \
    YOLO_OFFLINE=1 \
    YOLO_AUTOINSTALL=0 \
    YOLO_CONFIG_DIR=/app/var/ultralytics \
    MODEL_DIR=/data/models \
    DATA_DIR=/data/cache

# Pretrained base weights for hosts without network (README, Pretrained start):
#   docker compose build --build-arg YOLO_BASE_WEIGHTS=yolo11n.pt
# names a weights file in the build context (not under var/ or tests/: .dockerignore leaves them out),
# named as YOLO_BASE_MODEL. `lsb base-model install` refuses anything but a loadable detection
# checkpoint and writes it with its .sha256 to /app/weights, the read-only folder the worker looks at
# (YOLO_BASE_BUNDLED_DIR): not under MODEL_DIR, whose volume would hide it. Empty (the default): nothing
# is baked; the worker downloads the weights once into MODEL_DIR/base, or trains from random init.
ARG YOLO_BASE_WEIGHTS=
ENV YOLO_BASE_BUNDLED_DIR=/app/weights
RUN --mount=type=bind,target=/tmp/context \
    if [ -n "$YOLO_BASE_WEIGHTS" ]; then \
      YOLO_CONFIG_DIR=/tmp/yolo-build lsb base-model install "/tmp/context/$YOLO_BASE_WEIGHTS" --dir /app/weights -q \
      && rm -rf /tmp/yolo-build; \
    fi

USER app
# Fails the build when the `lsb` command does not start (as the service's user, with its environment).
RUN lsb --help > /dev/null
EXPOSE 9090

# /health never waits on a model or a training; python instead of curl (not in the slim image).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=4)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "backend.web.wsgi:app"]
