"""`rayft jobs`: list, read and stop the Ray jobs of a cluster (those `rayft submit` started and
any other).

    rayft jobs list [--address ADDR]
    rayft jobs logs JOB_ID [--follow] [--address ADDR]
    rayft jobs stop JOB_ID [--address ADDR]

The address and the auth token are found as for `rayft submit` (`cluster.submit.connect`).
"""

from __future__ import annotations

import argparse
import sys
import time

from cluster.submit import SubmitError, connect, follow_logs


def list_jobs(address: str | None) -> int:
    """Print one line per job: id, status, start time, entrypoint."""
    client = connect(address)
    jobs = sorted(client.list_jobs(), key=lambda job: job.start_time or 0)
    if not jobs:
        print("no jobs")
        return 0
    print(f"{'job id':<36} {'status':<10} {'started (UTC)':<20} entrypoint")
    for job in jobs:
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job.start_time / 1000))
            if job.start_time
            else "-"
        )
        job_id = job.submission_id or job.job_id or "-"
        print(f"{job_id:<36} {str(job.status):<10} {started:<20} {job.entrypoint}")
    return 0


def show_logs(address: str | None, job_id: str, *, follow: bool) -> int:
    """Print a job's logs so far, or follow them until the job ends."""
    client = connect(address)
    if follow:
        status = follow_logs(client, job_id)
        print(f"[rayft] job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    print(client.get_job_logs(job_id), end="")
    return 0


def stop_job(address: str | None, job_id: str) -> int:
    """Ask the cluster to stop a job; says whether it was still running."""
    client = connect(address)
    stopped = client.stop_job(job_id)
    print(
        f"[rayft] {job_id}: {'stop requested' if stopped else 'was not running'} "
        f"(status {client.get_job_status(job_id)})"
    )
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    """Dispatch `rayft jobs ACTION`; an unreachable cluster or unknown job exits with 1."""
    actions = {
        "list": lambda: list_jobs(args.address),
        "logs": lambda: show_logs(args.address, args.job_id, follow=args.follow),
        "stop": lambda: stop_job(args.address, args.job_id),
    }
    try:
        return actions[args.action]()
    except (SubmitError, RuntimeError) as err:
        print(f"rayft: {err}", file=sys.stderr)
        return 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `rayft jobs list|logs|stop` on the CLI."""
    parser = sub.add_parser("jobs", help="list, read or stop the cluster's Ray jobs")
    actions = parser.add_subparsers(dest="action", required=True)
    address_help = "http://head:8265, ray://head:10001 or head:6379 (default: RAY_ADDRESS)"
    listing = actions.add_parser("list", help="every job with its status")
    listing.add_argument("--address", help=address_help)
    logs = actions.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    logs.add_argument("--address", help=address_help)
    stop = actions.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")
    stop.add_argument("--address", help=address_help)
    parser.set_defaults(handler=cmd_jobs)
