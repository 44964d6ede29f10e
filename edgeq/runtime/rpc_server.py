"""A TVM RPC server for a board, in one process: needs only NumPy and the TVM runtime.

TVM's own ``python -m tvm.exec.rpc_server`` starts its server in a helper process that
needs cloudpickle; this script runs the same server loop (TVM's RPCServer state: one
listening thread, one forked process per session) without it, so it also runs under
qemu-aarch64. Usage::

    python rpc_server.py [--host 127.0.0.1] [--port 9090] [--tracker HOST:PORT --key KEY]

The protocol has no authentication: keep the default host (localhost) and reach the port
over an SSH tunnel (``ssh -L 9090:localhost:9090 pi@board``), never bind 0.0.0.0 on a
network you do not control.
"""

from __future__ import annotations

import argparse
import logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--port-end", type=int, default=None, help="try ports up to this one if --port is taken")
    parser.add_argument("--tracker", default=None, help="register with a TVM RPC tracker at HOST:PORT")
    parser.add_argument("--key", default="", help="device key to register with the tracker")
    args = parser.parse_args()
    from tvm.rpc import server

    tracker = None
    if args.tracker:
        host, _, port = args.tracker.rpartition(":")
        tracker = (host, int(port))
    logging.basicConfig(level=logging.INFO)
    state = server.PopenRPCServerState(
        args.host, args.port, args.port_end or args.port + 1, tracker_addr=tracker, key=args.key
    )
    state.thread.join()


if __name__ == "__main__":
    main()
