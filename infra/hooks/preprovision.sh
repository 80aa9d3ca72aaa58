#!/bin/sh
# azd preprovision hook, before anything is created:
# 1. check that the signed-in account may deploy (batchctl/doctor/deployer.py: its permissions
#    on the subscription against what infra/ and the hooks ask of Azure; docs/deploy.md names
#    the roles). A missing permission stops here, with what is missing, rather than halfway
#    through provisioning.
# 2. name the node image after its sources, so that provisioning points the Functions app at
#    the image that postprovision.sh builds (main.parameters.json reads NODE_IMAGE_TAG). The
#    same sources give the same tag, and the build is then skipped.
set -eu
cd "$(dirname "$0")/../.."

python3 -m batchctl.doctor.deployer check

tag=$(python3 infra/hooks/node_image.py tag)
azd env set NODE_IMAGE_TAG "$tag"
echo "preprovision: node image tag $tag"
