"""Serving a HOME checkpoint: an OpenAI-compatible API where the router picks the expert per request."""
