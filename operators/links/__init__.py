"""Operator extra links (buttons on a task instance in the Airflow UI)."""
