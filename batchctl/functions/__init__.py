"""The Functions app's client-side functions: HTTP API, upload trigger (Event Grid), sweeper."""
