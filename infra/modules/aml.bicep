// The Azure ML workspace and what it depends on: its Key Vault, its storage account and the
// container registry the node image is pushed to. The controller creates GPU clusters in this
// workspace at run time and deletes them afterwards; nothing here costs GPU time at rest.

param workspaceName string
param keyVaultName string
param registryName string
param storageAccountName string
@description('Application Insights the workspace links to (the same component as the app).')
param applicationInsightsId string
param location string
param tags object

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: keyVaultName
  location: location
  tags: tags
  //checkov:skip=CKV_AZURE_109: AML reaches this vault over its public endpoint (no managed VNet in this template); access is Entra RBAC only
  //checkov:skip=CKV_AZURE_189: same reason as CKV_AZURE_109
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    // RBAC, not access policies: redeploying the vault cannot wipe what AML granted itself.
    enableRbacAuthorization: true
    //checkov:skip=CKV_AZURE_110: purge protection would stop azd down --purge from freeing the name; the vault holds only AML's own workspace secrets
    //checkov:skip=CKV_AZURE_42: soft delete is on (7 days); purge protection is off for the reason given for CKV_AZURE_110
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  name: registryName
  location: location
  tags: tags
  sku: {
    name: 'Basic'
  }
  //checkov:skip=CKV_AZURE_139: AML clusters without a managed VNet pull over the public endpoint; private endpoints need the Premium SKU; pulls are Entra-authorised (AcrPull), the admin user is off
  //checkov:skip=CKV_AZURE_163: image scanning (Defender for Containers) is a subscription-level plan with its own cost; enable it there if wanted
  //checkov:skip=CKV_AZURE_166: quarantine needs the Premium SKU; the only image is the one `azd up` builds from this repository
  properties: {
    adminUserEnabled: false
    publicNetworkAccess: 'Enabled'
  }
}

// AML's own storage (job snapshots, logs, system datastores). Run data never lives here, and
// no key of it is read anywhere in this template or handed to the app.
resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  //checkov:skip=CKV_AZURE_43: false positive: the name is a parameter (main.bicep builds it from 'stml' and the lowercase resourceToken)
  //checkov:skip=CKV_AZURE_206: holds only AML job snapshots and logs, which are reproducible
  properties: {
    // AML's system datastores use the account key (kept in the workspace's Key Vault) on its
    // generally available path; identity-only workspace storage is a preview feature.
    allowSharedKeyAccess: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    //checkov:skip=CKV_AZURE_35: AML clusters without a managed VNet reach their workspace storage over the public endpoint
    //checkov:skip=CKV_AZURE_59: same reason as CKV_AZURE_35
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' = {
  name: workspaceName
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  sku: {
    name: 'Basic'
    tier: 'Basic'
  }
  //checkov:skip=CKV_AZURE_243: private endpoints need a VNet, which the Flex Consumption app and the clusters would then have to join; access is Entra RBAC only
  properties: {
    friendlyName: workspaceName
    keyVault: keyVault.id
    storageAccount: storage.id
    containerRegistry: registry.id
    applicationInsights: applicationInsightsId
    publicNetworkAccess: 'Enabled'
    hbiWorkspace: false
    v1LegacyMode: false
  }
}

output workspaceName string = workspace.name
output workspaceId string = workspace.id
output registryName string = registry.name
output registryId string = registry.id
output registryLoginServer string = registry.properties.loginServer
output keyVaultName string = keyVault.name
