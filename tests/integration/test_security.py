"""Least privilege: a producer may only publish commands; the service runs as its own user."""

from __future__ import annotations

import json
import urllib.parse
import uuid

import pika
import pika.exceptions
import pytest

from testing.broker import AMQP_BASE, EventListener, rabbit_api
from testing.system import fresh_system, unique


def test_producer_can_only_publish_commands_and_service_user_runs_the_service() -> None:
    producer, service = unique("producer"), unique("service")
    passwords = {"PRODUCER_PASSWORD": uuid.uuid4().hex, "SERVICE_PASSWORD": uuid.uuid4().hex}
    with fresh_system() as system:
        try:
            # Given the vhost's users made by topology.py --users
            result = system.run(
                "topology.py",
                "--users",
                "--producer-user",
                producer,
                "--service-user",
                service,
                env=passwords,
            )
            assert (
                passwords["PRODUCER_PASSWORD"] not in result.stdout + result.stderr
            )  # secrets never printed
            vhost = urllib.parse.quote(system.vhost, safe="")
            base = AMQP_BASE.split("@", 1)[1]
            producer_url = f"amqp://{producer}:{passwords['PRODUCER_PASSWORD']}@{base}/{vhost}"
            service_url = f"amqp://{service}:{passwords['SERVICE_PASSWORD']}@{base}/{vhost}"
            # And the service running as the service user
            system.start("order.catalog", "order.unrouted", env={"AMQP_URL": service_url})
            events = EventListener(system.amqp_url).start()
            try:
                # When the producer publishes a command (and one nobody knows)
                conn = pika.BlockingConnection(pika.URLParameters(producer_url))
                ch = conn.channel()
                ch.confirm_delivery()
                sku = unique("sec")
                props = pika.BasicProperties(
                    message_id=str(uuid.uuid4()),
                    content_type="application/json",
                    delivery_mode=2,
                    headers={"x-schema-version": 1},
                )
                body = {"sku": sku, "name": "n", "unit_price": 1, "merchant_id": "M", "warehouse_id": "W"}
                ch.basic_publish("order.commands", "sku.upsert", json.dumps(body).encode(), props)
                unknown_id = str(uuid.uuid4())
                ch.basic_publish(
                    "order.commands",
                    "no.such.command",
                    b"{}",
                    pika.BasicProperties(message_id=unknown_id, delivery_mode=2),
                )
                # Then the service applies it, and the unknown one still reaches the parking lot
                events.one("sku.upserted", sku=sku)
                events.one("command.rejected", message_id=unknown_id)
                # And the producer may not publish events, nor read any queue
                with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                    ch.basic_publish("order.events", "order.paid", b"{}", props)
                assert refused.value.reply_code == 403
                ch = conn.channel()
                with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                    ch.basic_get("order.parking-lot")
                assert refused.value.reply_code == 403
                conn.close()
            finally:
                events.stop()
        finally:
            for user in (producer, service):
                rabbit_api("DELETE", f"/users/{user}")
