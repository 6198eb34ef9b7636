"""`pop3proxy queue`: list, retry and delete queued outgoing mail."""

from __future__ import annotations

import logging
import sys
import time

from pop3proxy.config import queue_dir
from pop3proxy.ops.units import human_age
from pop3proxy.submission.delivery import attempt_delivery
from pop3proxy.submission.queue import EntryBusy, OutQueue, RetryPolicy, valid_id
from pop3proxy.submission.relay import load_passwords

log = logging.getLogger("pop3proxy.smtp")


def queue_command(settings, action: str, ids: list[str], out=None) -> int:
    """``pop3proxy queue list|flush|delete [ID...]``: 0 on success, 1 when something was not done,
    2 for a usage error."""
    out = out or sys.stdout
    err = sys.stderr if out is sys.stdout else out
    directory = queue_dir(settings)
    bad = [i for i in ids if not valid_id(i)]
    if bad:
        print(f"pop3proxy: not a queue id: {bad[0]!r}", file=err)
        return 2
    if action not in ("list", "flush", "delete"):
        print(f"pop3proxy: queue {action}: expected list, flush or delete", file=err)
        return 2
    if not directory.is_dir():
        if action == "delete" and ids:
            print(f"pop3proxy: no such queue entry: {ids[0]}", file=err)
            return 1
        print("the outgoing queue is empty", file=out)
        return 0
    try:
        return _queue_action(settings, OutQueue(directory), action, ids, out, err)
    except OSError as exc:
        print(f"pop3proxy: cannot use the queue {directory}: {exc.strerror or exc}", file=err)
        return 1


def _queue_action(settings, queue: OutQueue, action: str, ids: list[str], out, err) -> int:
    now = time.time()
    if action == "list":
        entries = [e for e in queue.entries() if not ids or e.id in ids]
        if not entries:
            print("the outgoing queue is empty", file=out)
            return 0
        print(f"{'ID':24} {'SENDER':28} {'RCPTS':>5} {'SIZE':>9} {'AGE':>5} {'TRIES':>5} {'NEXT TRY':>8}  LAST ERROR",
              file=out)
        for e in entries:
            next_try = "now" if e.next_try <= now else "in " + human_age(e.next_try - now, compact=True)
            sender = e.sender or "<>"
            print(
                f"{e.id:24} {sender[:28]:28} {len(e.recipients):>5} {e.size:>9} "
                f"{human_age(now - e.created, compact=True):>5} "
                f"{e.attempts:>5} {next_try:>8}  {e.last_error[:120]}",
                file=out,
            )
            print(f"{'':24} to: {', '.join(e.recipients)[:200]}", file=out)
        return 0
    if action == "delete":
        if not ids:
            print("pop3proxy: queue delete needs the IDs to delete (see `pop3proxy queue list`)", file=err)
            return 2
        failed = 0
        for entry_id in ids:
            try:
                with queue.claim(entry_id):
                    queue.remove(entry_id)
                print(f"{entry_id}: deleted", file=out)
            except KeyError:
                failed += 1
                print(f"{entry_id}: no such queue entry", file=out)
            except EntryBusy:
                failed += 1
                print(f"{entry_id}: being sent right now; try again in a moment", file=out)
        return 1 if failed else 0
    # flush
    try:
        passwords = load_passwords(settings)
    except ValueError as exc:
        print(f"pop3proxy: {exc}", file=err)
        return 1
    targets = ids or queue.ids()
    if not targets:
        print("the outgoing queue is empty", file=out)
        return 0
    left = 0
    retry = RetryPolicy()
    for entry_id in targets:
        try:
            result = attempt_delivery(queue, entry_id, settings, passwords, retry)
        except (OSError, ValueError) as exc:
            left += 1
            print(f"{entry_id}: failed: {exc}", file=out)
            continue
        if result.outcome == "delivered":
            print(f"{entry_id}: delivered ({result.detail})", file=out)
        elif result.outcome == "bounced":
            print(f"{entry_id}: bounced to the sender's mailbox ({result.detail})", file=out)
        elif result.outcome == "retry":
            left += 1
            when = time.strftime("%H:%M:%S UTC", time.gmtime(result.next_try or now))
            print(f"{entry_id}: still queued, next try {when} ({result.detail})", file=out)
        else:
            left += 1
            print(f"{entry_id}: {result.outcome}: {result.detail}", file=out)
    return 1 if left else 0
