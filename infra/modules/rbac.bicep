// Every role assignment of the deployment, in one place. Each grants a built-in role to one
// identity at the narrowest scope that role can work at: a container or a table where the
// names are known at deployment; the account where the names appear only at run time (the
// Functions host's containers, Durable's task hub queues and tables; the r-<runid>-in queues,
// which live in an account of their own so that the nodes' queue role reaches nothing else).

param storageAccountName string
@description('The run queues\' own storage account (run-queues.bicep).')
param runQueueAccountName string
param manifestsContainerName string
param mediaContainerName string
param runsContainerName string
param outputsContainerName string
param deadLetterContainerName string
param ledgerTableName string
param registryName string
param workspaceName string
param applicationInsightsName string
param computeIdentityName string

@description('The Function App\'s identity (controller).')
param controllerPrincipalId string
@description('The identity attached to the AML clusters.')
param computePrincipalId string
@description('The Event Grid system topic\'s identity (dead-lettering).')
param eventGridPrincipalId string
@description('Optional: the person or pipeline running azd, to upload manifests and media and read outputs with --auth-mode login.')
param userPrincipalId string = ''
@allowed([
  'User'
  'ServicePrincipal'
])
param userPrincipalType string = 'User'

// Built-in role definition ids (learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var storageBlobDataOwner = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' // Storage Blob Data Owner
var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe' // Storage Blob Data Contributor
var storageBlobDataReader = '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1' // Storage Blob Data Reader
var storageQueueDataContributor = '974c5e8b-45b9-4653-ba55-5f855dd0fb88' // Storage Queue Data Contributor
var storageTableDataContributor = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3' // Storage Table Data Contributor
var acrPull = '7f951dda-4ed3-4680-a7ca-43fe172d538d' // AcrPull
var monitoringMetricsPublisher = '3913510d-42f4-4e42-8a64-420c390055eb' // Monitoring Metrics Publisher
var azureMLComputeOperator = 'e503ece1-11d0-4e8e-8e2c-7a6c3bf38815' // AzureML Compute Operator
var azureMLDataScientist = 'f6c7c914-8db3-469d-8ca1-694a8f32e121' // AzureML Data Scientist
var managedIdentityOperator = 'f1a07417-d97a-45cb-824c-7a7467783830' // Managed Identity Operator

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource runQueueAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: runQueueAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource manifests 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: manifestsContainerName
}

resource media 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: mediaContainerName
}

resource runs 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: runsContainerName
}

resource outputs 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: outputsContainerName
}

resource deadLetter 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: deadLetterContainerName
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource ledger 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' existing = {
  parent: tableService
  name: ledgerTableName
}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: registryName
}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' existing = {
  name: workspaceName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource computeIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' existing = {
  name: computeIdentityName
}

// ---- The controller (Function App) ----------------------------------------------------------

// AzureWebJobsStorage with an identity needs Blob Data Owner (the host takes blob leases and
// creates its containers: secrets, Durable task hub leases and large messages); the Flex
// deployment package and the run's blobs are in the same account.
resource controllerBlobs 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, controllerPrincipalId, storageBlobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataOwner)
    principalId: controllerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Durable's control and work-item queues: named at run time from the task hub.
resource controllerQueues 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, controllerPrincipalId, storageQueueDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributor)
    principalId: controllerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Create, fill, count and delete each run's input queue (r-<runid>-in).
resource controllerRunQueues 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(runQueueAccount.id, controllerPrincipalId, storageQueueDataContributor)
  scope: runQueueAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributor)
    principalId: controllerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Durable history and instances tables (named from the task hub by the host) and the ledger.
resource controllerTables 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, controllerPrincipalId, storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributor)
    principalId: controllerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Telemetry with Entra auth (Application Insights has local auth disabled).
resource controllerTelemetry 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, controllerPrincipalId, monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisher)
    principalId: controllerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Create and delete the run's clusters: Microsoft.MachineLearningServices/workspaces/computes/*
// and nothing else (AzureML Data Scientist excludes compute create and delete).
resource controllerCompute 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, controllerPrincipalId, azureMLComputeOperator)
  scope: workspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', azureMLComputeOperator)
    principalId: controllerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Submit, watch and cancel jobs (and register their environments); it cannot create or delete
// compute, change or delete the workspace, or list its keys. The narrowest built-in role that
// can submit jobs; together with Compute Operator it is still short of Contributor.
resource controllerJobs 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, controllerPrincipalId, azureMLDataScientist)
  scope: workspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', azureMLDataScientist)
    principalId: controllerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Attaching a user-assigned identity to a cluster needs .../userAssignedIdentities/*/assign/action
// on that identity, and only on that one.
resource controllerAssignsComputeIdentity 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(computeIdentity.id, controllerPrincipalId, managedIdentityOperator)
  scope: computeIdentity
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', managedIdentityOperator)
    principalId: controllerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// ---- The compute (every node of every cluster) -----------------------------------------------

resource computeReadsMedia 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(media.id, computePrincipalId, storageBlobDataReader)
  scope: media
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataReader)
    principalId: computePrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Items' outputs, their index entries (_index/) and a node's refusal report: every blob a node
// writes, reads back (an assembler reads its segments' parts) or deletes is in outputs. Nothing
// of runs: claims, cancel flags, chunks and reports are the controller's.
resource computeWritesOutputs 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(outputs.id, computePrincipalId, storageBlobDataContributor)
  scope: outputs
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: computePrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Receive, renew visibility (update message) and delete on r-<runid>-in, whose names exist only
// at run time: Queue Data Contributor (Message Processor + Sender cannot renew visibility, a
// message write), on the run queues' own account, where no queue but run queues lives.
resource computeQueues 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(runQueueAccount.id, computePrincipalId, storageQueueDataContributor)
  scope: runQueueAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributor)
    principalId: computePrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource computeWritesLedger 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(ledger.id, computePrincipalId, storageTableDataContributor)
  scope: ledger
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributor)
    principalId: computePrincipalId
    principalType: 'ServicePrincipal'
  }
}

// AML clusters pull the job's image with the cluster's identity (the admin user is disabled).
resource computePullsImages 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, computePrincipalId, acrPull)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPull)
    principalId: computePrincipalId
    principalType: 'ServicePrincipal'
  }
}

// ---- Event Grid --------------------------------------------------------------------------------

resource eventGridDeadLetters 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deadLetter.id, eventGridPrincipalId, storageBlobDataContributor)
  scope: deadLetter
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: eventGridPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// ---- The person or pipeline running azd (optional) ---------------------------------------------

resource userUploadsManifests 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(manifests.id, userPrincipalId, storageBlobDataContributor)
  scope: manifests
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}

resource userUploadsMedia 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(media.id, userPrincipalId, storageBlobDataContributor)
  scope: media
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}

resource userReadsOutputs 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(outputs.id, userPrincipalId, storageBlobDataReader)
  scope: outputs
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataReader)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}

// `batchctl report RUN_ID` reads report.json and report.html under the run's prefix in runs.
resource userReadsReports 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(runs.id, userPrincipalId, storageBlobDataReader)
  scope: runs
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataReader)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}
