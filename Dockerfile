# The babysit image: the project on CPU PyTorch, for `babysit worker`, `babysit run` and the
# dashboard in docker-compose.yml. Build: docker compose build (or docker build -t babysit .)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# CPU wheels, pinned to the builds the project is tested with; the default (CUDA) wheels
# would add gigabytes that a CPU worker never uses. A GPU worker needs a CUDA base image.
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==2.14.1" "torchvision==0.29.1"

COPY pyproject.toml README.md ./
COPY babysit ./babysit
COPY studies ./studies
RUN pip install .

# Artifacts (the final model, the final training's checkpoint) go to one volume that every
# container mounts, so a final training started in one container resumes in another.
# Datasets that are not bundled (cifar10, fddb) are read from /data.
RUN useradd --create-home --uid 1000 babysit \
    && mkdir -p /artifacts /data \
    && chown babysit:babysit /artifacts /data
USER babysit
ENV BABYSIT_ARTIFACTS=/artifacts \
    BABYSIT_DATA=/data
VOLUME ["/artifacts"]

ENTRYPOINT ["babysit"]
CMD ["--help"]
