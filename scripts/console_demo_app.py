"""The tasks behind the console's screenshots (scripts/console_screenshots.py): a shop whose
emails, invoices and webhooks fail in a few recognisable ways, and thumbnails that run.

`build` makes a fresh App each time it is called (a consumer closes the App it ran); `app` is
one for `rabbitq console --app scripts.console_demo_app:app`, which only reads its task names.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

import rabbitq


class Email(BaseModel):
    to: str
    template: str
    order: int


class Invoice(BaseModel):
    invoice: int
    amount_cents: int
    currency: str = "EUR"


class Webhook(BaseModel):
    url: str
    event: str


class Thumbnail(BaseModel):
    image: str
    width: int


def connect_smtp(host: str) -> None:
    raise ConnectionRefusedError(f"{host}:587 refused the connection")


def render(template: str, order: int) -> str:
    raise KeyError(f"template {template!r} has no value for 'unsubscribe_url' (order {order})")


def charge(invoice: Invoice) -> None:
    raise ValueError(f"card declined for invoice {invoice.invoice} (insufficient funds)")


def build(release: asyncio.Event | None = None) -> rabbitq.App:
    """The shop's tasks; `thumbnails.resize` runs until `release` is set (never, without one)."""
    app = rabbitq.App()

    @app.task("emails.send", workload="emails")
    async def send(email: Email) -> None:
        if email.to.endswith("@bounced.example"):
            raise rabbitq.Park(f"{email.to} bounced permanently")
        connect_smtp("smtp.mail.example")

    @app.task("emails.render", workload="emails")
    async def render_email(email: Email) -> None:
        render(email.template, email.order)

    @app.task("invoices.charge", workload="invoices")
    async def charge_card(invoice: Invoice) -> None:
        charge(invoice)

    @app.task("webhooks.deliver", workload="webhooks")
    async def deliver(hook: Webhook) -> None:
        raise TimeoutError(f"{hook.url} did not answer within 10s")

    @app.task("thumbnails.resize", workload="thumbnails")
    async def resize(thumbnail: Thumbnail) -> None:
        await (release or asyncio.Event()).wait()

    return app


app = build()
