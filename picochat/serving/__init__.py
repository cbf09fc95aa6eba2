"""Serving: the terminal chat, the web UI + OpenAI-compatible API, and `picochat export`."""
