#!/bin/sh
# azd preprovision hook: name the node image after its sources, so that provisioning points the
# Functions app at the image that postprovision.sh builds (main.parameters.json reads
# NODE_IMAGE_TAG). The same sources give the same tag, and the build is then skipped.
set -eu
cd "$(dirname "$0")/../.."

tag=$(python3 infra/hooks/node_image.py tag)
azd env set NODE_IMAGE_TAG "$tag"
echo "preprovision: node image tag $tag"
