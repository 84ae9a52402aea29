# The image that `lsnet jobs schedule --emit k8s|k8s-cronjob` manifests run (the `cluster.image` of the
# job specs; default name lsnet:latest, see docs/image.md). Build it with `make image`.
#
# Base: Ray's own image of the Ray version this project pins (pyproject.toml: ray==2.60.0) for Python
# 3.11 (pyproject.toml: requires-python >=3.11,<3.12). RAY_VARIANT picks CPU or CUDA nodes:
#   py311-cpu (default) | py311-gpu
# tests/test_image.py checks that the tag and the pins below equal pyproject.toml's.
ARG RAY_VARIANT=py311-cpu
FROM rayproject/ray:2.60.0-${RAY_VARIANT}

# `lsnet` stamps every run with the commit it ran (the image has no .git): make image passes it.
ARG LSNET_GIT_COMMIT=unknown
ENV LSNET_GIT_COMMIT=${LSNET_GIT_COMMIT} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /home/ray/lsnet

# 1. The pinned dependencies of pyproject.toml, exactly, in their own layer (rebuilt only when a pin
#    changes). The Ray wheel of the base image already satisfies the ray pin; pip keeps it.
RUN pip install \
        "torch==2.14.1" \
        "torchvision==0.29.1" \
        "mmcv-lite==2.2.0" \
        "ray[train,tune,default]==2.60.0" \
        "mlflow==3.17.2"

# 2. The project (editable: job specs name configs/ and jobs/ relative to the checkout, which is the
#    working directory of every job; see .dockerignore for what stays out). Its other dependencies
#    are the ranges of pyproject.toml; the pins above are already satisfied and stay as they are.
COPY --chown=ray:users . /home/ray/lsnet
RUN pip install -e . \
    && python -c "import lsnet, pipelines.cli; print('lsnet', lsnet.__file__)"

# A RayJob's head and worker pods run `ray start ...` (KubeRay's command); a plain `docker run` gets
# the CLI.
CMD ["lsnet", "--help"]
