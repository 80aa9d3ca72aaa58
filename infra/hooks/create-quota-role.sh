#!/bin/sh
# Optional, once per subscription: create the custom role that lets the controller read Azure ML
# quota and VM sizes (infra/roles/aml-quota-reader.json), and record its id in the azd
# environment (AML_QUOTA_READER_ROLE_ID), which `azd provision` then assigns to the controller.
#
# Creating a role definition needs Microsoft.Authorization/roleDefinitions/write at the
# subscription: Owner or User Access Administrator. `azd up` itself never creates one, so a
# deployer with Contributor + Role Based Access Control Administrator can deploy without it;
# plans then go without quota ("quota unknown"). Rerunning is safe: an existing role is reused.
set -eu
cd "$(dirname "$0")/../.."

subscription="${AZURE_SUBSCRIPTION_ID:-$(az account show --query id --output tsv)}"
# Role names are unique in the tenant; the subscription in the name keeps one per subscription.
name="batchctl AML quota reader ($subscription)"
role_id=$(az role definition list --name "$name" --scope "/subscriptions/$subscription" \
    --query "[0].name" --output tsv --only-show-errors)
if [ -z "$role_id" ]; then
    definition=$(sed -e "s#{subscriptionId}#$subscription#" \
        -e "s#\"Name\": \"batchctl AML quota reader\"#\"Name\": \"$name\"#" \
        infra/roles/aml-quota-reader.json)
    role_id=$(az role definition create --role-definition "$definition" \
        --query name --output tsv --only-show-errors)
    echo "create-quota-role: created '$name' ($role_id)"
fi
azd env set AML_QUOTA_READER_ROLE_ID "$role_id"
echo "create-quota-role: AML_QUOTA_READER_ROLE_ID=$role_id; \`azd provision\` assigns it to the controller"
