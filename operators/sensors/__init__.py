"""Sensors: tasks that wait for something outside the pipeline (people, services)."""
