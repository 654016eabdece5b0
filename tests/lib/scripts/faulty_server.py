"""nc server with one fault armed by a trigger file: argv = repo, fault, trigger, config."""

import os
import sys
import threading
import time

sys.path.insert(0, sys.argv[1])
import ncctl

repo, fault, trigger, config = sys.argv[1:5]


def armed():
    return os.path.exists(trigger)


def dies_when_armed(self):
    while not armed():
        time.sleep(0.1)
    raise RuntimeError("injected fault")


if fault in ("network-loop", "stall"):
    real_tick = ncctl.NetworkServer._tick

    def tick(self, now):
        if armed():
            if fault == "stall":
                threading.Event().wait()  # stuck for good, the thread still alive
            raise RuntimeError("injected fault")
        real_tick(self, now)

    ncctl.NetworkServer._tick = tick
elif fault == "store-worker":
    ncctl.StoreWorker.run = dies_when_armed  # no jobs come: this server has no nodes
elif fault == "cache-sync":
    ncctl.CacheSync.run = dies_when_armed
elif fault == "token-sweeper":
    ncctl.TokenSweeper.run = dies_when_armed
elif fault == "failing-command":  # a bug in one command handed to the packet loop
    real_start = ncctl.NetworkServer.start

    def start(self):
        real_start(self)

        def submit_when_armed():
            while not armed():
                time.sleep(0.1)
            self.call_soon(lambda: 1 / 0)

        threading.Thread(target=submit_when_armed, daemon=True).start()

    ncctl.NetworkServer.start = start
elif fault == "grpc-bootstrap":
    real_start = ncctl.start_grpc_servers

    def start_grpc_servers(*args, **kwargs):
        servers = real_start(*args, **kwargs)

        def stop_when_armed():
            while not armed():
                time.sleep(0.1)
            servers[0].stop(None)

        threading.Thread(target=stop_when_armed, daemon=True).start()
        return servers

    ncctl.start_grpc_servers = start_grpc_servers
else:
    raise SystemExit(f"unknown fault {fault}")
sys.exit(ncctl.main(["server", "--config", config]))
