// The run queues' own storage account (r-<runid>-in, created and deleted by the controller at
// run time), apart from the host's account: the nodes need Queue Data Contributor on whatever
// queues they consume (visibility renewal is a message write), and queue names appear only at
// run time, so that role is granted on an account. In this account it reaches run queues only,
// never the Durable task hub's control and work-item queues, its tables or any blob.
// Identity only: shared keys are disabled, as in storage.bicep.

@description('Storage account name (3-24 lowercase letters and digits).')
param name string
param location string
param tags object

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  //checkov:skip=CKV_AZURE_35: the Flex Consumption app (no VNet integration) and AML clusters (no managed VNet) reach storage over its public endpoint; every request is Entra-authorised because shared keys are disabled
  //checkov:skip=CKV_AZURE_59: same reason as CKV_AZURE_35; a private-endpoint variant needs VNet integration for the app and a managed VNet for AML
  //checkov:skip=CKV_AZURE_206: queue messages are reproducible from the run's chunks; LRS keeps the cost at rest low
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: account
  name: 'default'
}

output name string = account.name
output id string = account.id
output queueEndpoint string = account.properties.primaryEndpoints.queue
