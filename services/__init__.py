"""Configuration, chain client, store, HTTP API and the command line."""
