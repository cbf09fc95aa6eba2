"""Evaluations: bits per byte, CORE, the chat evals, and the `picochat eval` command."""
