"""PAYMENT_WEBHOOK_SECRET is required (contract v1.1 "Running it"), except in DEV_MODE."""

from __future__ import annotations

import json

import pytest

from domain.signing import sign
from settings import DEV_WEBHOOK_SECRET
from testing.broker import EventListener, queue_counts
from testing.system import fresh_system, unique

NO_SECRET = {"PAYMENT_WEBHOOK_SECRET": "", "DEV_MODE": "false"}


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        (NO_SECRET, "is not set"),
        ({**NO_SECRET, "PAYMENT_WEBHOOK_SECRET": "dev-secret-change-me"}, "is a published example value"),
    ],
)
def test_consumers_refuse_to_start_without_a_real_secret(env: dict[str, str], problem: str) -> None:
    with fresh_system() as system:
        # When the payment consumer, or every consumer, starts without a usable secret
        for args in (("order.payment",), ("--all",)):
            result = system.run("run_consumer.py", *args, check=False, env=env)
            # Then it exits non-zero at once, naming the setting, and consumes nothing
            assert result.returncode == 2, result.stderr
            assert f"PAYMENT_WEBHOOK_SECRET {problem}" in result.stderr
        assert queue_counts(system.amqp_url, "order.payment")[1] == 0


def test_dev_mode_starts_with_a_development_secret() -> None:
    with fresh_system() as system:
        # Given the payment consumer started in DEV_MODE without a secret
        system.start("order.payment", env={**NO_SECRET, "DEV_MODE": "true"})
        events = EventListener(system.amqp_url).start()
        try:
            # When payments are signed with the development secret (as `orders sign` does in
            # DEV_MODE) and with another key
            body = {
                "order_no": unique("O"),
                "payment_no": unique("P"),
                "method": "alipay",
                "amount": 100,
                "paid_at": "2026-01-01T00:00:00Z",
            }
            signed = json.loads(
                system.run(
                    "-m", "cli.main", "sign", json.dumps(body), env={**NO_SECRET, "DEV_MODE": "true"}
                ).stdout
            )
            assert signed["signature"] == sign(body, DEV_WEBHOOK_SECRET)
            system.send("payment.notify", signed)
            other = {**body, "payment_no": unique("P")}
            system.send("payment.notify", {**other, "signature": sign(other, "another-key")})
            # Then the consumer runs with the development secret: the first is checked past its
            # signature (the order is unknown), the second is refused for its signature
            first = events.one("payment.rejected", payment_no=body["payment_no"])
            assert first["reason"] == "UNKNOWN_ORDER"
            second = events.one("payment.rejected", payment_no=other["payment_no"])
            assert second["reason"] == "BAD_SIGNATURE"
        finally:
            events.stop()
        assert "DEV_MODE" in (system.log_dir / f"{system.vhost}-order.payment.log").read_text()
