"""A cluster's nodes in one RABBITQ_URL: how the list reads, the order a process tries it in,
failing over, and masking every node's password."""

from __future__ import annotations

import aiormq
import pytest

from rabbitq import _connection as connection
from rabbitq._connection import NodeOrder, first_answering, mask_url, node_of, nodes, scrub
from rabbitq._declare import unavailable_detail
from rabbitq._errors import ConnectionFailed


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://u:p@h1:5672/vh", ["amqp://u:p@h1:5672/vh"]),
        (
            "amqp://u:p@h1,h2:5673,amqp://h3",
            ["amqp://u:p@h1", "amqp://u:p@h2:5673", "amqp://u:p@h3"],
        ),
        (  # the vhost and the query are given once too
            "amqp://u:p@h1/prod?heartbeat=30, h2 ,h3/other",
            [
                "amqp://u:p@h1/prod?heartbeat=30",
                "amqp://u:p@h2/prod?heartbeat=30",
                "amqp://u:p@h3/other?heartbeat=30",
            ],
        ),
        (  # a node with credentials of its own keeps them
            "amqps://u:p@h1:5671,amqps://v:q@h2:5671",
            ["amqps://u:p@h1:5671", "amqps://v:q@h2:5671"],
        ),
        ("amqp://h1,h2", ["amqp://h1", "amqp://h2"]),
        ("amqp://u:p@h1,", ["amqp://u:p@h1"]),
    ],
)
def test_nodes(url: str, expected: list[str]) -> None:
    assert nodes(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://u:p@h1:5673/", "h1:5673"),
        ("amqp://h1", "h1:5672"),
        ("amqps://h1", "h1:5671"),
        ("amqp://[::1]:5672", "[::1]:5672"),
    ],
)
def test_node_of(url: str, expected: str) -> None:
    assert node_of(url) == expected


def test_each_process_shuffles_once_and_starts_from_the_node_that_answered() -> None:
    url = "amqp://u:p@n1,n2,n3,n4,n5"
    orders = {tuple(NodeOrder(seed).candidates(url)) for seed in range(20)}
    assert len(orders) > 1, "replicas would all start on the same node"
    order = NodeOrder(7)
    first = order.candidates(url)
    assert sorted(first) == sorted(nodes(url)) and order.candidates(url) == first
    order.answered(url, first[2])
    assert order.candidates(url) == first[2:] + first[:2]


def test_every_nodes_password_is_masked() -> None:
    url = "amqp://u:s3cret@h1,amqp://v:0ther@h2"
    assert mask_url(url) == "amqp://u:***@h1,amqp://v:***@h2"
    said = f"cannot reach {url}; amqp://u:s3cret@h2 refused; v:0ther"
    cleaned = scrub(said, url)
    assert "s3cret" not in cleaned and "0ther" not in cleaned


async def test_first_answering_fails_over_and_sticks(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "amqp://u:p@n1,n2,n3"
    monkeypatch.setattr(connection, "NODE_ORDER", NodeOrder(1))
    order = connection.NODE_ORDER.candidates(url)
    down = {order[0]}
    tried: list[str] = []

    async def attempt(node: str, seconds: float) -> str:
        tried.append(node)
        assert seconds == connection.NODE_TIMEOUT_SECONDS
        if node in down:
            raise ConnectionFailed(mask_url(node), "refused")
        return node

    result, node = await first_answering(url, attempt)
    assert result == node == order[1] and tried == order[:2]
    assert connection.current_node(url) == order[1]
    tried.clear()
    down = set(order)
    with pytest.raises(ConnectionFailed) as caught:
        await first_answering(url, attempt)
    assert tried == order[1:] + order[:1]
    assert "no node answered" in str(caught.value) and "u:p@" not in str(caught.value)
    assert all(node_of(n) in str(caught.value) for n in order)


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        (
            "NOT_FOUND - home node 'rabbit@10.0.0.1' of durable queue 'a.b' in vhost '/' is "
            "down or inaccessible",
            "home node 'rabbit@10.0.0.1' of durable queue 'a.b' in vhost '/' is down or "
            "inaccessible",
        ),
        ("NOT_FOUND - no queue 'a.b' in vhost '/'", ""),
        ("NOT_FOUND - no exchange 'a' in vhost '/'", ""),
    ],
)
def test_a_404_for_a_queue_on_a_down_node_is_told_from_a_missing_queue(
    text: str, detail: str
) -> None:
    assert unavailable_detail(aiormq.exceptions.ChannelNotFoundEntity(text)) == detail
