// The run's storage account: the Functions host (AzureWebJobsStorage, Durable task hub,
// Flex deployment package), the manifests whose uploads start runs, the media the nodes read,
// the run records and reports, the outputs the nodes write and the ledger table. The run queues
// are in an account of their own (run-queues.bicep).
// Identity only: shared keys are disabled, so no connection string with a key can work.

@description('Storage account name (3-24 lowercase letters and digits).')
param name string
param location string
param tags object

@description('Blob containers the application uses (the first receives the manifests).')
param manifestsContainerName string
param mediaContainerName string
param runsContainerName string
param outputsContainerName string

@description('Blob container holding the Flex Consumption deployment package.')
param deploymentContainerName string

@description('Blob container where Event Grid dead-letters undeliverable BlobCreated events.')
param deadLetterContainerName string

@description('Table holding one terminal record per item.')
param ledgerTableName string

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  //checkov:skip=CKV_AZURE_35: the Flex Consumption app (no VNet integration) and AML clusters (no managed VNet) reach storage over its public endpoint; every request is Entra-authorised because shared keys are disabled
  //checkov:skip=CKV_AZURE_59: same reason as CKV_AZURE_35; a private-endpoint variant needs VNet integration for the app and a managed VNet for AML
  //checkov:skip=CKV_AZURE_206: run data is reproducible from the manifest and the media; LRS keeps the cost at rest low
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
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource manifests 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: manifestsContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource media 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: mediaContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource runs 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: runsContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource outputs 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: outputsContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource deployment 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource deadLetter 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deadLetterContainerName
  properties: {
    publicAccess: 'None'
  }
}

// The host's queues (Durable's control and work-item queues); run queues are in run-queues.bicep.
resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource ledger 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: ledgerTableName
}

output name string = storage.name
output id string = storage.id
output blobEndpoint string = storage.properties.primaryEndpoints.blob
output queueEndpoint string = storage.properties.primaryEndpoints.queue
output tableEndpoint string = storage.properties.primaryEndpoints.table
