"""``python -m cluster.ray_nodes --address HOST:PORT --ips IP[,IP...] [--timeout S]``: wait until every
node of a Ray cluster has joined; ``--head``: wait for the head node and print the address Ray
registered it under.

The Slurm bootstrap starts one Ray node per allocated node and must not guess when they are up
(no ``sleep`` and hope): this polls the cluster's node table until a live node exists for every
expected IP, then exits 0; after the timeout it exits 1 naming the nodes that never joined. Ray
replaces a loopback node address (127.0.0.1, the ``NodeAddr`` of a one-machine Slurm install) by
the machine's own address, so the head is waited for by its role instead (the
``node:__internal_head__`` resource) and the bootstrap uses the address it reports.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time


def _accepts_connections(address: str) -> bool:
    """Whether the head's GCS port accepts TCP connections yet (``ray.init`` would otherwise retry for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2.0):
            return True
    except OSError:
        return False


HEAD_RESOURCE = "node:__internal_head__"
"""The resource Ray gives the head node (and only it)."""


def alive_nodes(address: str) -> list[dict]:
    """The live nodes of the Ray cluster at ``address`` (``ray.nodes()`` entries; connecting as a short-lived
    driver)."""
    import ray

    if not ray.is_initialized():
        if not _accepts_connections(address):
            raise ConnectionError(f"nothing listens on {address} yet")
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    return [node for node in ray.nodes() if node["Alive"]]


def alive_node_ips(address: str) -> set[str]:
    """IPs of the live nodes of the Ray cluster at ``address``."""
    return {node["NodeManagerAddress"] for node in alive_nodes(address)}


def head_ip(address: str) -> str | None:
    """The address the live head node of the cluster at ``address`` registered under (None: not joined yet)."""
    heads = [node["NodeManagerAddress"] for node in alive_nodes(address) if HEAD_RESOURCE in node["Resources"]]
    return heads[0] if heads else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.ray_nodes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="HOST:PORT of the Ray head (GCS)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--ips", help="comma-separated node IPs that must join")
    which.add_argument("--head", action="store_true", help="wait for the head node; print the address Ray "
                       "registered it under (the machine's own for a loopback --node-ip-address)")
    parser.add_argument("--names", default="", help="comma-separated node names, for the error message")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    args = parser.parse_args(argv)
    if args.head:
        return _wait_for_head(args)
    expected = [ip for ip in args.ips.split(",") if ip]
    names = dict(zip(expected, args.names.split(","))) if args.names else {}
    deadline, joined, last_error = time.monotonic() + args.timeout, set(), None
    while time.monotonic() < deadline:
        try:
            joined = alive_node_ips(args.address)
            last_error = None
        except Exception as error:  # the head is still starting: GCS not reachable yet
            last_error = error
        if set(expected) <= joined:
            print(f"ray cluster at {args.address}: all {len(expected)} nodes joined", flush=True)
            return 0
        time.sleep(2.0)
    missing = [f"{names.get(ip, ip)} ({ip})" for ip in expected if ip not in joined]
    reason = f"; last error: {last_error}" if last_error else ""
    print(f"error: after {args.timeout:.0f} s these nodes had not joined the Ray cluster at {args.address}: "
          f"{', '.join(missing)}{reason}", file=sys.stderr)
    return 1


def _wait_for_head(args: argparse.Namespace) -> int:
    deadline, last_error = time.monotonic() + args.timeout, None
    while time.monotonic() < deadline:
        try:
            ip = head_ip(args.address)
            last_error = None
        except Exception as error:  # the head is still starting: GCS not reachable yet
            ip, last_error = None, error
        if ip:
            print(ip, flush=True)
            return 0
        time.sleep(2.0)
    reason = f"; last error: {last_error}" if last_error else ""
    print(f"error: after {args.timeout:.0f} s the head node {args.names or ''} had not joined the Ray cluster at "
          f"{args.address}{reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
