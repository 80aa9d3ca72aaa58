#!/bin/sh
# azd postdeploy hook: subscribe the app's Event Grid trigger (start_run_from_blob) to
# BlobCreated events in the manifests container, by deploying
# infra/modules/blob-event-subscription.bicep.
#
# This cannot happen during `azd provision`: the webhook URL needs the Functions host's
# `eventgrid_extension` system key, which exists only once code with an Event Grid trigger is
# deployed and indexed, and Event Grid validates the endpoint when the subscription is created.
# The key never passes through this script: the module reads it with listKeys on the host.
# Rerunning is safe (the deployment is idempotent).
set -eu
cd "$(dirname "$0")/../.."

: "${AZURE_RESOURCE_GROUP:?is set by azd from infra/main.bicep outputs}"
: "${AZURE_FUNCTION_APP_NAME:?is set by azd from infra/main.bicep outputs}"
: "${AZURE_FUNCTION_APP_URL:?is set by azd from infra/main.bicep outputs}"
: "${AZURE_EVENTGRID_SYSTEM_TOPIC_NAME:?is set by azd from infra/main.bicep outputs}"
: "${AZURE_STORAGE_ACCOUNT_NAME:?is set by azd from infra/main.bicep outputs}"

has_key() {
    az functionapp keys list --resource-group "$AZURE_RESOURCE_GROUP" \
        --name "$AZURE_FUNCTION_APP_NAME" --query 'systemKeys.eventgrid_extension != null' \
        --output tsv --only-show-errors 2>/dev/null || echo false
}

attempt=0
until [ "$(has_key)" = true ]; do
    attempt=$((attempt + 1))
    if [ "$attempt" -gt 20 ]; then
        echo "postdeploy: no eventgrid_extension key on $AZURE_FUNCTION_APP_NAME yet; is the" \
            "Event Grid trigger deployed? Rerun infra/hooks/postdeploy.sh (through 'azd hooks run postdeploy')." >&2
        exit 1
    fi
    # A request starts the host if Flex Consumption has scaled the app to zero.
    curl --silent --output /dev/null --max-time 30 "$AZURE_FUNCTION_APP_URL/" || true
    sleep 10
done

az deployment group create --resource-group "$AZURE_RESOURCE_GROUP" \
    --name blob-event-subscription \
    --template-file infra/modules/blob-event-subscription.bicep \
    --parameters \
        systemTopicName="$AZURE_EVENTGRID_SYSTEM_TOPIC_NAME" \
        functionAppName="$AZURE_FUNCTION_APP_NAME" \
        containerName="${AZURE_MANIFESTS_CONTAINER:-manifests}" \
        deadLetterStorageAccountName="$AZURE_STORAGE_ACCOUNT_NAME" \
        deadLetterContainerName="${AZURE_DEAD_LETTER_CONTAINER:-eventgrid-deadletter}" \
    --only-show-errors --output none
echo "postdeploy: BlobCreated in ${AZURE_MANIFESTS_CONTAINER:-manifests} now starts runs"
