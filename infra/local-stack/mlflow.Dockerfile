# MLflow tracking server for the local stack: the official image (same MLflow as constraints.txt)
# plus the PostgreSQL driver and boto3 for the S3 artifact store.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.10 boto3==1.44.8
USER 1000
