// The Event Grid system topic for the storage account's events. The subscription that sends
// BlobCreated events in the manifests container to the app's Event Grid trigger lives in
// blob-event-subscription.bicep, which the postdeploy hook deploys once the app's code (and so
// the Event Grid extension's system key) exists; see infra/hooks/postdeploy.sh.

param name string
param location string
param tags object

@description('Resource id of the storage account whose events this topic publishes.')
param storageAccountId string

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: name
  location: location
  tags: tags
  // The identity writes undeliverable events to the dead-letter container (role in rbac.bicep).
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: storageAccountId
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

output name string = topic.name
output principalId string = topic.identity.principalId
