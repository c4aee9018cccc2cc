#!/usr/bin/env bash
# Build (and optionally push) the crossdim Ray image from the repository root.
#   infra/build-image.sh            # build  $IMAGE_REPO:$TAG
#   PUSH=1 infra/build-image.sh     # build and push
# The tag is derived from pyproject.toml's version and constraints.txt's Ray pin, so every
# manifest (ray_cluster.yaml, infra/kuberay/*.yaml) names the same image; tests/test_infra.py
# checks that they do.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE_REPO="${IMAGE_REPO:-ghcr.io/crossdim/crossdim}"
PYTHON_TAG="py311"
CUDA_TAG="cu130"
VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)"
RAY_VERSION="$(sed -n 's/^ray==\(.*\)$/\1/p' constraints.txt | head -n1)"
TAG="${VERSION}-ray${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}"

docker build -f infra/Dockerfile \
  --build-arg "RAY_VERSION=${RAY_VERSION}" \
  --build-arg "PYTHON_TAG=${PYTHON_TAG}" \
  --build-arg "CUDA_TAG=${CUDA_TAG}" \
  -t "${IMAGE_REPO}:${TAG}" .
echo "built ${IMAGE_REPO}:${TAG}"
if [[ "${PUSH:-0}" == "1" ]]; then
  docker push "${IMAGE_REPO}:${TAG}"
fi
