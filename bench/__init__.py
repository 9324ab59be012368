"""Benchmarks of the order service against the raw floor of pika and psycopg2 (`python -m bench`)."""
