"""Service settings: one pydantic-settings class, read once at process start."""

from __future__ import annotations

import logging
import re
import sys
from datetime import timedelta
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> timedelta:
    """Read `900`, `2s`, `15m`, `5d` (a bare number is seconds) as a positive timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use e.g. 900, 2s, 15m, 5d)")
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{value!r} must be a positive duration")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """The shortest exact label for a duration (`2s`, `15m`, `5d`, `1500ms`); used in queue names."""
    ms = round(delta.total_seconds() * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]

# The webhook secret DEV_MODE uses when PAYMENT_WEBHOOK_SECRET is unset. It is in this file for
# everyone to read, so it is refused outside DEV_MODE, like the other published example values
# (the README's before contract v1.1); anyone could sign a payment with one of them.
DEV_WEBHOOK_SECRET = "dev-mode-only-webhook-secret-anyone-can-read"
PUBLISHED_WEBHOOK_SECRETS = frozenset(
    {DEV_WEBHOOK_SECRET, "dev-secret-change-me", "change-me", "changeme", "secret", "your-secret-here"}
)
_dev_secret_warned = False


class InsecureSetting(ValueError):
    """A setting that must not be used as it is (a missing or published secret)."""


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/orders"
    order_payment_timeout: Duration = timedelta(minutes=15)
    aftersale_review_timeout: Duration = timedelta(days=5)
    auto_confirm_receipt_after: Duration = timedelta(days=10)
    # Required (contract v1.1): read through webhook_secret(), which refuses none or a published
    # example value unless dev_mode is on.
    payment_webhook_secret: SecretStr = SecretStr("")
    # Local development only (`make run` turns it on): a missing webhook secret gets
    # DEV_WEBHOOK_SECRET, and published example values are let through, with a loud warning.
    dev_mode: bool = False
    prefetch: int = Field(default=100, ge=1, le=10_000)
    # Timers leave their delay queue this long before they are due and wait in the timeouts
    # consumer until then, so the broker's dead-lettering and the queue in front of the consumer
    # are not added to a deadline. A timer is never applied before it is due. 0 turns it off.
    timer_lead_ms: int = Field(default=300, ge=0, le=60_000)
    # The timeouts consumer's prefetch: enough to hold the timers of the lead at a burst's rate.
    timer_prefetch: int = Field(default=1000, ge=1, le=65_535)
    # How long after a deadline the backstop sweeper steps in for a timer the broker lost.
    sweeper_grace: Duration = timedelta(seconds=30)
    sweeper_interval: Duration = timedelta(seconds=10)
    # In-process retries of a transient failure before the message goes to the retry queues.
    transient_retry_seconds: float = Field(default=20.0, ge=0)
    retry_delays: str = "1s,10s,60s"
    heartbeat: int = Field(default=10, ge=0)
    queue_type: Literal["classic", "quorum"] = "classic"
    relay_enabled: bool = True
    relay_batch: int = Field(default=500, ge=1)
    metrics_port: int | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"

    @property
    def timer_lead(self) -> timedelta:
        return timedelta(milliseconds=self.timer_lead_ms)

    @property
    def retry_steps(self) -> list[timedelta]:
        """The retry delay queue steps, shortest first."""
        return [parse_duration(part) for part in self.retry_delays.split(",") if part.strip()]

    def webhook_secret(self) -> str:
        """The HMAC key of payment.notify and refund.result.

        InsecureSetting (naming PAYMENT_WEBHOOK_SECRET) when it is unset or a published example
        value; in DEV_MODE those are allowed, with a warning (an unset one is DEV_WEBHOOK_SECRET).
        """
        secret = self.payment_webhook_secret.get_secret_value()
        if not secret.strip():
            problem = "is not set"
        elif secret.strip().lower() in PUBLISHED_WEBHOOK_SECRETS:
            problem = "is a published example value"
        else:
            return secret
        if not self.dev_mode:
            raise InsecureSetting(
                f"PAYMENT_WEBHOOK_SECRET {problem}: set it to a long random value, e.g. "
                "`openssl rand -hex 32` (DEV_MODE=true, for local development only, uses a "
                "development secret)"
            )
        global _dev_secret_warned
        if not _dev_secret_warned:
            _dev_secret_warned = True
            logging.getLogger("settings").warning(
                f"DEV_MODE: PAYMENT_WEBHOOK_SECRET {problem}; using a development secret anyone can "
                "read, so anyone can sign payments and refunds. Never run like this in production."
            )
        return secret if secret.strip() else DEV_WEBHOOK_SECRET


def load_settings() -> Settings:
    """Read settings once; a missing or malformed one stops the process with its name."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()]
        print("invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def require_webhook_secret(settings: Settings) -> str:
    """The webhook secret, or stop the process naming PAYMENT_WEBHOOK_SECRET (as load_settings)."""
    try:
        return settings.webhook_secret()
    except InsecureSetting as exc:
        print(f"invalid settings:\n  {exc}", file=sys.stderr)
        raise SystemExit(2) from None
