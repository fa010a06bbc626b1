"""Forge's Airflow operators: thin wrappers that choose where a forge/ job runs and wire its
inputs/outputs. Layout follows Airflow's providers: hooks/ (connections), links/ (UI extra
links), runtimes/ (one module per execution mode), the operators themselves at the top."""
