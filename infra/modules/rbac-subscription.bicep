// The controller's only access above its resource group: reading Azure ML's regional quota
// and VM sizes to size a run's fleet. Both are subscription-scope operations
// (GET /subscriptions/{id}/providers/Microsoft.MachineLearningServices/locations/{region}/
// usages and .../vmSizes), so no workspace-scoped role covers them; no built-in role grants
// just these two reads (Reader would expose the whole subscription, Azure AI Developer would
// write every workspace in it), hence a custom role: infra/roles/aml-quota-reader.json.
//
// The deployment only ASSIGNS that role, never creates it: creating a role definition needs
// Microsoft.Authorization/roleDefinitions/write, which neither Contributor nor Role Based
// Access Control Administrator holds (docs/deploy.md names those roles). Someone who may
// (Owner, or User Access Administrator) creates it once per subscription with
// infra/hooks/create-quota-role.sh, which sets AML_QUOTA_READER_ROLE_ID in the azd
// environment. Without it planning still works, but uncapped (batchctl notes "quota unknown").
// Part of the rbac module; a file of its own only because it deploys at subscription scope.
targetScope = 'subscription'

@description('The Function App\'s identity (controller).')
param controllerPrincipalId string

@description('Optional: the guid of the AML quota reader role (infra/roles/aml-quota-reader.json), created beforehand by infra/hooks/create-quota-role.sh; empty grants nothing.')
param quotaReaderRoleId string = ''

resource controllerReadsQuota 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(quotaReaderRoleId)) {
  name: guid(subscription().id, controllerPrincipalId, quotaReaderRoleId)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', quotaReaderRoleId)
    principalId: controllerPrincipalId
    principalType: 'ServicePrincipal'
  }
}
