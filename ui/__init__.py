"""The live Panel dashboard (#6)."""
