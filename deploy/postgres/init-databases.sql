-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d), as POSTGRES_USER.
-- MLflow tracking, MLflow basic-auth and Optuna each get their own database: MLflow and Optuna both keep
-- an `alembic_version` table, so they must never share one.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE optuna;
