# The MLflow tracking server of infra/compose.yaml: MLflow with its basic-auth app, the PostgreSQL
# driver of its backend store (psycopg 3) and boto3 for the artifacts it proxies into MinIO or S3.
FROM python:3.11-slim

RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg[binary]>=3.2" "boto3>=1.34" \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir -p /var/lib/mlflow-auth && chown mlflow /var/lib/mlflow-auth  # the auth database's volume

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
