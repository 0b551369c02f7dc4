"""Plugins and runnable problem configurations (installed as ``enkal.problems``)."""
