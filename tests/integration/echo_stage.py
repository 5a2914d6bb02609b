"""A stage worker in its own process, for tests that kill it: copies each
GenerateRequest from one topic to another, optionally slowly.

    python echo_stage.py BOOTSTRAP IN_TOPIC OUT_TOPIC GROUP DELAY_S
"""

from __future__ import annotations

import signal
import sys
import time

from freemask.shared.bus import InboundMessage, OutboundMessage, StageWorker
from freemask.shared.config import BusConfig
from freemask.shared.metrics import ServiceMetrics
from freemask.v1 import generate_pb2


def main() -> None:
    bootstrap, in_topic, out_topic, group, delay_s = sys.argv[1:6]

    def copy(message: InboundMessage) -> list[OutboundMessage]:
        request = message.decode(generate_pb2.GenerateRequest)
        time.sleep(float(delay_s))
        return [OutboundMessage(out_topic, request.sample_id, request)]

    config = BusConfig(bootstrap_servers=bootstrap, group_prefix=group)
    worker = StageWorker("echo", in_topic, copy, config, ServiceMetrics("echo"))
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    print("worker started", flush=True)
    worker.run()


if __name__ == "__main__":
    main()
