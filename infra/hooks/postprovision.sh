#!/bin/sh
# azd postprovision hook: build and push the node image with `az acr build` (the build runs in
# the registry; no local Docker needed), unless the registry already holds that exact tag.
# Needs the Azure CLI, logged in to the same subscription as azd (`az login`).
set -eu
cd "$(dirname "$0")/../.."

: "${AZURE_CONTAINER_REGISTRY_NAME:?is set by azd from infra/main.bicep outputs}"
: "${AZURE_NODE_IMAGE:?is set by azd from infra/main.bicep outputs}"

dockerfile=node_image/Dockerfile
if [ ! -f "$dockerfile" ]; then
    echo "postprovision: $dockerfile is missing; the AML clusters would have no image to run" >&2
    exit 1
fi

# AZURE_NODE_IMAGE is <login server>/<repository>:<tag>, exactly what the app settings name.
image=${AZURE_NODE_IMAGE#*/}
tag=${image##*:}
if [ "$tag" != latest ] && az acr repository show --name "$AZURE_CONTAINER_REGISTRY_NAME" \
    --image "$image" --only-show-errors >/dev/null 2>&1; then
    echo "postprovision: $AZURE_NODE_IMAGE is already built"
    exit 0
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
python3 infra/hooks/node_image.py stage "$context"
az acr build --registry "$AZURE_CONTAINER_REGISTRY_NAME" --image "$image" \
    --file "$dockerfile" --platform linux/amd64 --only-show-errors "$context"
echo "postprovision: pushed $AZURE_NODE_IMAGE"
