// The controller: a Python 3.11 Function App on the Flex Consumption plan, running as its
// user-assigned identity. Every connection is identity-based; no setting holds a key.
// The app settings are the contract between this template and the code's settings classes
// (ControllerSettings in batchctl/settings.py, AmlSettings in batchctl/compute):
// tests/test_infra.py compares the BATCHCTL_* names below with the fields those classes read.

param name string
param planName string
param location string
param tags object

@description('azd service name (azure.yaml) that deploys code to this app.')
param serviceName string

@description('The controller identity (user-assigned).')
param identityId string
param identityClientId string

@description('Endpoints of the storage account holding AzureWebJobsStorage, the deployment package and the runs.')
param blobEndpoint string
param queueEndpoint string
param tableEndpoint string
@description('Queue endpoint of the run queues\' own account (run-queues.bicep).')
param runQueueEndpoint string
param deploymentContainerName string

param manifestsContainerName string
param mediaContainerName string
param runsContainerName string
param outputsContainerName string
param ledgerTableName string

param applicationInsightsConnectionString string

@description('Other storage sources manifests may name, as \'account/container\' or \'account/*\'.')
param allowedSources array = []

@description('Where AML clusters are created and jobs submitted.')
param amlWorkspaceName string
@description('Fully qualified node image reference (<registry>/<repository>:<tag>).')
param nodeImage string
@description('The identity attached to every cluster the controller creates.')
param computeIdentityId string
param computeIdentityClientId string

@description('Flex Consumption instance size.')
@allowed([
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Upper bound on controller instances; the work runs on AML, not here.')
param maximumInstanceCount int = 40

// Flex Consumption runs one Python worker process per instance (FUNCTIONS_WORKER_PROCESS_COUNT
// is not valid there), so this is the number of concurrent synchronous invocations an
// instance can run. host.json's maxConcurrentActivityFunctions + maxConcurrentOrchestratorFunctions
// must fit in it (tests/test_infra.py checks).
var pythonThreadpoolThreadCount = 16

var appSettings = {
  // The host's storage (triggers, Durable task hub, keys): identity-based connection.
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  AzureWebJobsStorage__blobServiceUri: blobEndpoint
  AzureWebJobsStorage__queueServiceUri: queueEndpoint
  AzureWebJobsStorage__tableServiceUri: tableEndpoint
  // Telemetry with Entra auth (the component has local auth disabled).
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD;ClientId=${identityClientId}'
  // DefaultAzureCredential picks the user-assigned identity by this client id.
  AZURE_CLIENT_ID: identityClientId
  PYTHON_THREADPOOL_THREAD_COUNT: string(pythonThreadpoolThreadCount)
  // batchctl.settings.ControllerSettings
  BATCHCTL_STORAGE_AUTH: 'managed_identity'
  BATCHCTL_BLOB_URL: blobEndpoint
  // The run queues live in an account of their own (run-queues.bicep); the host's queues
  // (Durable's) stay in AzureWebJobsStorage's.
  BATCHCTL_QUEUE_URL: runQueueEndpoint
  BATCHCTL_TABLE_URL: tableEndpoint
  BATCHCTL_MANIFESTS_CONTAINER: manifestsContainerName
  BATCHCTL_MEDIA_CONTAINER: mediaContainerName
  BATCHCTL_RUNS_CONTAINER: runsContainerName
  BATCHCTL_OUTPUTS_CONTAINER: outputsContainerName
  BATCHCTL_LEDGER_TABLE: ledgerTableName
  BATCHCTL_COMPUTE_BACKEND: 'aml'
  // Manifests may always name videos in this deployment's media container; these are other
  // 'account/container' sources (the compute identity needs read access there too).
  BATCHCTL_ALLOWED_SOURCES: string(allowedSources)
  // The AML workspace the compute backend works in.
  BATCHCTL_AML_SUBSCRIPTION_ID: subscription().subscriptionId
  BATCHCTL_AML_RESOURCE_GROUP: resourceGroup().name
  BATCHCTL_AML_WORKSPACE_NAME: amlWorkspaceName
  BATCHCTL_AML_NODE_IMAGE: nodeImage
  BATCHCTL_AML_IDENTITY_RESOURCE_ID: computeIdentityId
  BATCHCTL_AML_IDENTITY_CLIENT_ID: computeIdentityClientId
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  //checkov:skip=CKV_AZURE_225: the controller keeps no state on its instances (Durable state lives in storage); Flex zone redundancy is region-dependent and not needed for a batch controller
  properties: {
    reserved: true
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': serviceName
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  //checkov:skip=CKV_AZURE_222: the run API and the Event Grid blob webhook must be reachable; both require a function or system key
  //checkov:skip=CKV_AZURE_17: callers authenticate with function keys; Event Grid cannot present a client certificate to the webhook
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    //checkov:skip=CKV_AZURE_78: Flex Consumption has no FTP(S) endpoint; basic publishing credentials are disabled below
    //checkov:skip=CKV_AZURE_212: scaling to zero is the point (no cost at rest); the plan adds instances on demand
    //checkov:skip=CKV_AZURE_213: Flex Consumption replaces unhealthy instances itself and scales to zero, so there is no fixed instance to probe
    siteConfig: {
      minTlsVersion: '1.2'
      http20Enabled: true
      appSettings: [for setting in items(appSettings): {
        name: setting.key
        value: setting.value
      }]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${blobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// Deployments authenticate with Entra tokens; basic (publishing-profile) auth stays off.
resource ftpBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

output name string = site.name
output id string = site.id
output defaultHostName string = site.properties.defaultHostName
