"""`batchctl doctor`: checks, before anything is spent, what a first run needs.

``report`` holds the one-line result of a check; ``local`` the checks of this machine (run
for real, also in tests); ``deployment`` the checks of a deployed app, each over a narrow
``DeploymentReader`` whose real implementation (``azure_reader``) is the only part that
talks to Azure.
"""
