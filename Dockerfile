FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml ./
COPY domain domain
COPY store store
COPY consumers consumers
COPY publishers publishers
COPY cli cli
COPY migrations migrations
COPY scripts scripts
COPY alembic.ini settings.py topology.py run_consumer.py logs.py metrics.py ./
RUN pip install .
USER nobody
CMD ["python", "run_consumer.py", "--list"]
