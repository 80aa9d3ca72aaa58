// BlobCreated events in the manifests container -> the app's Event Grid trigger. The event
// carries the blob's name and ETag, all a run's start needs; a blob trigger would read the whole
// manifest into the host's memory first.
//
// Why a separate deployment: the webhook URL carries the Event Grid extension's system key
// (`eventgrid_extension`), which the Functions host creates only after code with an Event Grid
// trigger is deployed and indexed, and Event Grid validates the endpoint when the subscription is
// created. Neither holds during `azd provision`, so infra/hooks/postdeploy.sh deploys this module
// after `azd deploy`. The key is read here with listKeys on the host (never printed or stored
// by the hook); it is the Functions host's key, not a storage key.

@description('The storage account\'s Event Grid system topic (eventgrid.bicep).')
param systemTopicName string

@description('The Function App hosting the Event Grid trigger.')
param functionAppName string

@description('The Event Grid-triggered function: functionName=<name> in the webhook URL.')
param functionName string = 'start_run_from_blob'

@description('Container whose BlobCreated events start runs.')
param containerName string = 'manifests'

@description('Storage account and container for undeliverable events.')
param deadLetterStorageAccountName string
param deadLetterContainerName string = 'eventgrid-deadletter'

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: systemTopicName
}

resource site 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource deadLetterStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: deadLetterStorageAccountName
}

var eventGridExtensionKey = listKeys(resourceId('Microsoft.Web/sites/host', functionAppName, 'default'), '2023-12-01').systemKeys.eventgrid_extension
var webhookUrl = 'https://${site.properties.defaultHostName}/runtime/webhooks/eventgrid?functionName=${functionName}&code=${eventGridExtensionKey}'

resource subscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: topic
  name: '${containerName}-to-${replace(functionName, '_', '-')}'
  properties: {
    eventDeliverySchema: 'EventGridSchema'
    destination: {
      endpointType: 'WebHook'
      properties: {
        endpointUrl: webhookUrl
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      // The trailing slash keeps a container named e.g. "manifests-old" out.
      subjectBeginsWith: '/blobServices/default/containers/${containerName}/'
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: deadLetterStorage.id
          blobContainerName: deadLetterContainerName
        }
      }
    }
  }
}

output name string = subscription.name
