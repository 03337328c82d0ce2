"""An in-process Flower Grid for contract tests: real ClientApp, real strategies, no network.

It replaces only the transport (the SuperLink hop) so a full round of every method runs in
a second.  End-to-end runs on Flower's Simulation Engine live in tests/integration.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid


class LoopbackGrid(Grid):
    """Delivers each message to ``client_app`` under the destination node's Context."""

    def __init__(
        self, client_app, num_nodes: int, fail_nodes: Iterable[int] = (), fail_types: tuple[str, ...] = ("train",)
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": nid - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for nid in range(1, num_nodes + 1)
        }
        self.fail_nodes = set(fail_nodes)
        self.fail_types = fail_types
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    # Grid's abstract interface -------------------------------------------------------
    def set_run(self, run) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self):  # noqa: D102
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            if nid in self.fail_nodes and msg.metadata.message_type in self.fail_types:
                replies.append(Message(Error(code=0, reason="simulated node failure"), reply_to=msg))
                continue
            try:
                replies.append(self.client_app(msg, self.contexts[nid]))
            except Exception as exc:  # the node runtime turns client exceptions into error replies
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        self.replies.extend(replies)
        return replies


def private_methods() -> list[str]:
    """Registered methods that compose with DP-SGD and CKKS (the centralized reference pools raw data and refuses
    them; its strategy says so with ``composes_with_privacy = False``)."""
    from secure_fedvlp.methods import get_method, list_methods

    return [m for m in list_methods() if getattr(get_method(m).strategy, "composes_with_privacy", True)]
