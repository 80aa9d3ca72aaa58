"""The Functions app's client-side functions: HTTP API, blob trigger and sweeper."""
