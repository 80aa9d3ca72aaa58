// The controller's only access above its resource group: reading Azure ML's regional quota
// and VM sizes to size a run's fleet. Both are subscription-scope operations
// (GET /subscriptions/{id}/providers/Microsoft.MachineLearningServices/locations/{region}/
// usages and .../vmSizes), so no workspace-scoped role covers them; no built-in role grants
// just these two reads (Reader would expose the whole subscription), hence a custom role.
// Part of the rbac module; it is a file of its own only because it deploys at subscription
// scope. Without it planning still works, but uncapped (batchctl notes "quota unknown").
targetScope = 'subscription'

@description('The Function App\'s identity (controller).')
param controllerPrincipalId string

@description('The deployment\'s resource token: role names must be unique in the tenant.')
param resourceToken string

// learn.microsoft.com/azure/role-based-access-control/permissions/ai-machine-learning
var quotaReadActions = [
  'Microsoft.MachineLearningServices/locations/usages/read' // Usage report for aml compute resources in a subscription
  'Microsoft.MachineLearningServices/locations/vmsizes/read' // Get supported vm sizes
]

resource quotaReader 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, 'batchctl-aml-quota-reader', resourceToken)
  properties: {
    roleName: 'batchctl AML quota reader ${resourceToken}'
    description: 'Reads Azure ML regional compute usages and VM sizes (batchctl fleet sizing); nothing else.'
    type: 'CustomRole'
    assignableScopes: [
      subscription().id
    ]
    permissions: [
      {
        actions: quotaReadActions
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
  }
}

resource controllerReadsQuota 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(subscription().id, controllerPrincipalId, quotaReader.id)
  properties: {
    roleDefinitionId: quotaReader.id
    principalId: controllerPrincipalId
    principalType: 'ServicePrincipal'
  }
}
