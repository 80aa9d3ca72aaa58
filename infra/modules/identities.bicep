// The two user-assigned identities. Their role assignments live in rbac.bicep.
//  - controller: the Function App (storage for the host and the runs, AML compute and jobs).
//  - compute: attached to every AML cluster the controller creates (queues, media, outputs,
//    records, image pulls).

param controllerIdentityName string
param computeIdentityName string
param location string
param tags object

resource controller 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: controllerIdentityName
  location: location
  tags: tags
}

resource compute 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: computeIdentityName
  location: location
  tags: tags
}

output controllerId string = controller.id
output controllerName string = controller.name
output controllerClientId string = controller.properties.clientId
output controllerPrincipalId string = controller.properties.principalId
output computeId string = compute.id
output computeName string = compute.name
output computeClientId string = compute.properties.clientId
output computePrincipalId string = compute.properties.principalId
