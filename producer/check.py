"""`imgstream check`: the operator's preflight on a cluster, one line per thing that must hold."""

from __future__ import annotations

from dataclasses import dataclass, field

from imgstream.kafka_clients import KafkaSetupError, open_client, open_consumer
from imgstream.kafka_clients.permissions import topic_access
from imgstream.producer.topics import topic_differences, topic_plans
from imgstream.schemas.config import KafkaConfig


@dataclass
class CheckReport:
    """Each line is (ok, text); the check passes only when every line is ok."""

    lines: list[tuple[bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.lines)

    def add(self, ok: bool, text: str) -> None:
        self.lines.append((ok, text))

    def render(self) -> str:
        return "\n".join(f"{'ok  ' if ok else 'FAIL'}  {text}" for ok, text in self.lines)


def _login(kafka: KafkaConfig) -> str:
    if kafka.security_protocol.startswith("SASL_"):
        who = f" as {kafka.sasl_username}" if kafka.sasl_username else f" ({kafka.oauth.provider} token)"
        return f"{kafka.security_protocol} {kafka.sasl_mechanism}{who}"
    if kafka.security_protocol == "SSL":
        return "SSL" + (" with a client certificate" if kafka.ssl_certfile else "")
    return "PLAINTEXT, no login"


async def run_check(kafka: KafkaConfig) -> CheckReport:
    """Connect and authenticate, then for every topic: exists as planned, readable, writable."""
    report = CheckReport()
    try:
        client = await open_client(kafka, role="check")
    except KafkaSetupError as exc:
        report.add(False, f"connect to {kafka.bootstrap} ({_login(kafka)}): {exc.message}")
        return report
    try:
        brokers = len(client.cluster.brokers())
        report.add(True, f"connect to {kafka.bootstrap} ({_login(kafka)}): {brokers} broker(s) answer")
        plans = topic_plans(kafka.topics, kafka.topic_settings, max_message_bytes=kafka.max_message_bytes)
        consumer = await open_consumer(kafka, role="check")
        try:
            access = {a.topic: a for a in await topic_access(client, [p.name for p in plans], consumer)}
        finally:
            await consumer.stop()
        existing = [p for p in plans if access[p.name].exists]
        differences = await topic_differences(kafka, existing) if existing else {}
    finally:
        await client.close()
    for plan in plans:
        found = access[plan.name]
        if not found.exists:
            report.add(False, f"topic {plan.name}: missing (imgstream topics create makes it)")
            continue
        differs = differences.get(plan.name)
        report.add(not differs, f"topic {plan.name}: {found.partitions} partitions, "
                   + (f"differs from its settings: {'; '.join(differs)}" if differs else "settings as planned"))
        for action, allowed in (("read", found.read), ("write", found.write)):
            how = "reported by the broker" if found.how == "reported" else "probed"
            verdict = {True: "allowed", False: "NOT allowed (grant the ACL)", None: "could not be told"}[allowed]
            report.add(allowed is True, f"topic {plan.name}: {action} {verdict} ({how})")
    return report
