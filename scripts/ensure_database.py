"""Create the database DATABASE_URL names when it does not exist yet (used by `make run`)."""

from __future__ import annotations

import psycopg2
from sqlalchemy.engine import make_url

from settings import load_settings


def main() -> None:
    url = make_url(load_settings().database_url)
    conn = psycopg2.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, dbname="postgres"
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{url.database}"')
            print(f"created database {url.database}")
    conn.close()


if __name__ == "__main__":
    main()
