#!/usr/bin/env bash
# PostgreSQL of docker-compose.yml: one role and one database each for Airflow's metadata and MLflow's
# backend store. The postgres image runs this once, when its data volume is new
# (/docker-entrypoint-initdb.d), as the superuser over the local socket.
# Passwords come from the environment (AIRFLOW_DB_PASSWORD, MLFLOW_DB_PASSWORD) and reach SQL as psql
# variables (:'name' quotes them), never through the shell or a file.
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
  -v airflow_password="$AIRFLOW_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
-- nobody else connects to these two
REVOKE CONNECT ON DATABASE airflow FROM PUBLIC;
REVOKE CONNECT ON DATABASE mlflow FROM PUBLIC;
SQL
echo "init-databases: created databases airflow and mlflow"
