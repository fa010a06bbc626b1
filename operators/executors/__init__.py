"""Executors of the embedded stack (scripts/stack.sh)."""
