#!/usr/bin/env bash
# Make sure PostgreSQL and RabbitMQ (with its management plugin) run on this machine.
# Starts them with the machine's usual commands when they are down; fails with a clear message.
set -u

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port, seconds
  for _ in $(seq 1 "$2"); do port_open "$1" && return 0; sleep 1; done
  return 1
}

if ! port_open 5432; then
  echo "PostgreSQL is down; starting it" >&2
  version=$(ls /etc/postgresql 2>/dev/null | sort -n | tail -1)
  if [ -n "$version" ] && command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  wait_port 5432 30 || { echo "error: PostgreSQL is not running on 127.0.0.1:5432 and could not be started (tried pg_ctlcluster --skip-systemctl-redirect ${version:-?} main start)" >&2; exit 1; }
fi

if ! port_open 5672; then
  echo "RabbitMQ is down; starting it" >&2
  if command -v rabbitmq-server >/dev/null; then
    rabbitmq-server -detached || true
  fi
  wait_port 5672 90 || { echo "error: RabbitMQ is not running on 127.0.0.1:5672 and could not be started (tried rabbitmq-server -detached)" >&2; exit 1; }
fi

if ! port_open 15672; then
  if command -v rabbitmq-plugins >/dev/null; then
    rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 || true
  fi
  wait_port 15672 60 || { echo "error: the RabbitMQ management API (127.0.0.1:15672) is not available; run: rabbitmq-plugins enable rabbitmq_management" >&2; exit 1; }
fi
echo "PostgreSQL and RabbitMQ are up"
