// batchctl on Azure: `azd up` provisions this, deploys the Functions app and then subscribes
// it to BlobCreated events of the manifests container (azure.yaml hooks). This file only
// composes modules; every name derives from one resourceToken and every resource carries
// azd-env-name.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; seeds every resource name.')
param environmentName string

@minLength(1)
@description('Region for all resources (one where Flex Consumption and Azure ML are offered).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Optional: object id of the person or pipeline running azd (uploads manifests and media, reads outputs).')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
])
param principalType string = 'User'

@description('Other storage sources manifests may name (\'account/container\' or \'account/*\'); this deployment\'s media container is always allowed. Grant the compute identity read access there yourself.')
param allowedSources array = []

@description('Optional: guid of the AML quota reader role (infra/roles/aml-quota-reader.json), which infra/hooks/create-quota-role.sh creates once per subscription; empty leaves fleet sizing without quota.')
param amlQuotaReaderRoleId string = ''

@description('Tag of the node image; infra/hooks/preprovision.sh sets it from a hash of the image\'s sources.')
param nodeImageTag string = 'latest'

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}

// Names the code also knows (batchctl.settings defaults); passed to storage, app settings and rbac.
var manifestsContainerName = 'manifests'
var mediaContainerName = 'media'
var runsContainerName = 'runs'
var outputsContainerName = 'outputs'
var ledgerTableName = 'ledger'
var deploymentContainerName = 'app-package-${resourceToken}'
var deadLetterContainerName = 'eventgrid-deadletter'
var nodeImageRepository = 'batchctl-node'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identities 'modules/identities.bicep' = {
  name: 'identities'
  scope: rg
  params: {
    controllerIdentityName: 'id-controller-${resourceToken}'
    computeIdentityName: 'id-compute-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    manifestsContainerName: manifestsContainerName
    mediaContainerName: mediaContainerName
    runsContainerName: runsContainerName
    outputsContainerName: outputsContainerName
    deploymentContainerName: deploymentContainerName
    deadLetterContainerName: deadLetterContainerName
    ledgerTableName: ledgerTableName
  }
}

// The run queues in an account of their own: the nodes' queue role reaches nothing else.
module runQueues 'modules/run-queues.bicep' = {
  name: 'run-queues'
  scope: rg
  params: {
    name: 'stq${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
  }
}

module aml 'modules/aml.bicep' = {
  name: 'aml'
  scope: rg
  params: {
    workspaceName: 'mlw-${resourceToken}'
    keyVaultName: 'kv-${resourceToken}'
    registryName: 'cr${resourceToken}'
    storageAccountName: 'stml${resourceToken}'
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    location: location
    tags: tags
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  params: {
    name: 'func-${resourceToken}'
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    serviceName: 'controller'
    identityId: identities.outputs.controllerId
    identityClientId: identities.outputs.controllerClientId
    blobEndpoint: storage.outputs.blobEndpoint
    queueEndpoint: storage.outputs.queueEndpoint
    runQueueEndpoint: runQueues.outputs.queueEndpoint
    tableEndpoint: storage.outputs.tableEndpoint
    deploymentContainerName: deploymentContainerName
    manifestsContainerName: manifestsContainerName
    mediaContainerName: mediaContainerName
    runsContainerName: runsContainerName
    outputsContainerName: outputsContainerName
    ledgerTableName: ledgerTableName
    applicationInsightsConnectionString: monitoring.outputs.applicationInsightsConnectionString
    allowedSources: allowedSources
    amlWorkspaceName: aml.outputs.workspaceName
    nodeImage: '${aml.outputs.registryLoginServer}/${nodeImageRepository}:${nodeImageTag}'
    computeIdentityId: identities.outputs.computeId
    computeIdentityClientId: identities.outputs.computeClientId
  }
}

module eventGrid 'modules/eventgrid.bicep' = {
  name: 'eventgrid'
  scope: rg
  params: {
    name: 'evgt-${resourceToken}'
    location: location
    tags: tags
    storageAccountId: storage.outputs.id
  }
}

module rbac 'modules/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    runQueueAccountName: runQueues.outputs.name
    manifestsContainerName: manifestsContainerName
    mediaContainerName: mediaContainerName
    runsContainerName: runsContainerName
    outputsContainerName: outputsContainerName
    deadLetterContainerName: deadLetterContainerName
    ledgerTableName: ledgerTableName
    registryName: aml.outputs.registryName
    workspaceName: aml.outputs.workspaceName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    computeIdentityName: identities.outputs.computeName
    controllerPrincipalId: identities.outputs.controllerPrincipalId
    computePrincipalId: identities.outputs.computePrincipalId
    eventGridPrincipalId: eventGrid.outputs.principalId
    userPrincipalId: principalId
    userPrincipalType: principalType
  }
}

// The one grant above the resource group (AML quota and VM-size reads live at subscription
// scope), of a role created beforehand, never here; the rest of the rbac is in
// modules/rbac.bicep.
module rbacSubscription 'modules/rbac-subscription.bicep' = {
  name: 'rbac-subscription'
  scope: subscription()
  params: {
    controllerPrincipalId: identities.outputs.controllerPrincipalId
    quotaReaderRoleId: amlQuotaReaderRoleId
  }
}

// azd writes these into the environment; the hooks and docs/deploy.md use them.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_URL string = 'https://${functionApp.outputs.defaultHostName}'
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_RUN_QUEUE_ACCOUNT_NAME string = runQueues.outputs.name
output AZURE_STORAGE_BLOB_ENDPOINT string = storage.outputs.blobEndpoint
output AZURE_MANIFESTS_CONTAINER string = manifestsContainerName
output AZURE_MEDIA_CONTAINER string = mediaContainerName
output AZURE_OUTPUTS_CONTAINER string = outputsContainerName
output AZURE_DEAD_LETTER_CONTAINER string = deadLetterContainerName
output AZURE_EVENTGRID_SYSTEM_TOPIC_NAME string = eventGrid.outputs.name
output AZURE_CONTAINER_REGISTRY_NAME string = aml.outputs.registryName
output AZURE_CONTAINER_REGISTRY_ENDPOINT string = aml.outputs.registryLoginServer
output AZURE_NODE_IMAGE string = '${aml.outputs.registryLoginServer}/${nodeImageRepository}:${nodeImageTag}'
output AZURE_ML_WORKSPACE_NAME string = aml.outputs.workspaceName
output AZURE_APPLICATION_INSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
// Object ids of the two identities, for `batchctl doctor` to read their role assignments.
output AZURE_CONTROLLER_PRINCIPAL_ID string = identities.outputs.controllerPrincipalId
output AZURE_COMPUTE_PRINCIPAL_ID string = identities.outputs.computePrincipalId
output AZURE_COMPUTE_IDENTITY_NAME string = identities.outputs.computeName
// What the batchctl client reads (batchctl.azdenv reads them from .azure/<env>/.env, and
// `set -a; eval "$(azd env get-values)"; set +a` exports them); no key is ever an output.
output BATCHCTL_APP_URL string = 'https://${functionApp.outputs.defaultHostName}'
output BATCHCTL_BLOB_URL string = storage.outputs.blobEndpoint
