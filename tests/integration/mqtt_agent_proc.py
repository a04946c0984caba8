"""An AgentControl in its own process, for tests that kill it (not a test module).

usage: python mqtt_agent_proc.py DEVICE_ID HOST PORT APPLIED_LOG [KEEPALIVE_S [CA CERT KEY]]
(KEEPALIVE_S: the MQTT keepalive, default 30; CA CERT KEY: mutual TLS with these files, default plaintext.)
Prints "ready" once subscribed to its commands; appends each applied command as a JSON line to APPLIED_LOG;
closes cleanly when stdin reaches EOF or says "quit".
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from edge_agent.mqtt_control import AgentControl  # noqa: E402
from protos.mqtt import Ack, Command, MqttTls  # noqa: E402


def main() -> int:
    device_id, host, port, applied_log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    keepalive_s = int(sys.argv[5]) if len(sys.argv) > 5 else 30
    tls = MqttTls(*sys.argv[6:9]) if len(sys.argv) > 8 else None

    def apply(cmd: Command) -> Ack:
        with open(applied_log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), "command": json.loads(cmd.to_json())}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return Ack(cmd.command_id, True, f"applied {cmd.kind}")

    agent = AgentControl(device_id, host, port, on_command=apply, flush_interval_ms=50, reconnect_min_s=1,
                         reconnect_max_s=2, keepalive_s=keepalive_s, tls=tls)
    agent.start(wait_s=15)
    agent.publish_state(mode="split", cut="c1", bandwidth_mbps=18.9, model="toy")
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
    agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
