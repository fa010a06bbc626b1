"""Forge: base LLM -> production system. Importable and runnable without Airflow."""

__version__ = "0.1.0"
