"""The mbox backend under kill -9: a child process appends or rewrites and is SIGKILLed at a chosen point.

Whatever the point, readers see every message whole or not at all (never a fragment, never twice), and
recovery (`recover`, as a login runs it) removes what the crash left: a torn tail, rewrite copies.
"""

from __future__ import annotations

import mailbox
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pop3proxy.proxy.sync import recover
from pop3proxy.store.mbox import MboxMailbox
from pop3proxy.store.state import UserState

REPO = Path(__file__).resolve().parents[2]
BIG = 30 * 1024 * 1024

# The child stores three small messages (and, before a deletion, a big one) cleanly, arms the crash,
# then appends a big message or deletes the second one. `point` says where it kills itself with SIGKILL
# (a real kill -9: no cleanup, no finally blocks):
#   mid-write      halfway through writing the big message, or through the rewrite's copy
#   after-fsync    the new bytes are written and fsync'ed, nothing more
#   after-commit   the commit file was replaced (the append is complete; the rewrite is not renamed yet)
#   before-rename  the rewrite's copy is complete and committed, the mbox not yet replaced
CHILD = r"""
import os, signal, sys
from pop3proxy.store.mbox import MboxMailbox

path, point, op, big = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
small = [b"Subject: m%d\r\n\r\nbody %d\r\nFrom here\r\n" % (i, i) for i in range(3)]
large = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * (big // 80)
box = MboxMailbox(path)
box.add_many(small[:2])
box.add(small[2])
if op == "delete":
    box.add(large)
keys = [info.key for info in box.list()]
real_write, real_fsync, real_replace = os.write, os.fsync, os.replace
writes = 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def write(fd, data):
    global writes
    writes += 1
    if point == "mid-write" and (len(data) > 1 << 20 if op == "append" else writes == 3):
        real_write(fd, bytes(data[: len(data) // 2]))
        die()
    return real_write(fd, data)

def fsync(fd):
    real_fsync(fd)
    if point == "after-fsync" and os.fstat(fd).st_size > 1 << 20:
        die()

def replace(src, dst):
    if point == "before-rename" and str(dst) == path:
        die()
    real_replace(src, dst)
    if point == "after-commit" and str(dst).endswith(".committed"):
        die()

os.write, os.fsync, os.replace = write, fsync, replace
if op == "append":
    box.add_many([large])
else:
    box.delete([keys[1]])
print("not killed")
"""
SMALL = [b"Subject: m%d\r\n\r\nbody %d\r\nFrom here\r\n" % (i, i) for i in range(3)]
LARGE = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * (BIG // 80)


def run_child(path: Path, point: str, op: str) -> None:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), point, op, str(BIG)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL, f"the child was not killed at {point}: {done.stdout}{done.stderr}"


def messages_of(box: MboxMailbox) -> list[bytes]:
    out = []
    for info in box.list():
        with box.open(info.key) as f:
            out.append(f.read())
    return out


@pytest.mark.parametrize(
    "op, point",
    [("append", "mid-write"), ("append", "after-fsync"), ("append", "after-commit"),
     ("delete", "mid-write"), ("delete", "after-fsync"), ("delete", "after-commit"), ("delete", "before-rename")],
)
def test_kill_during_an_mbox_write_serves_whole_messages_only(tmp_path: Path, op: str, point: str) -> None:
    path = tmp_path / "mbox"
    run_child(path, point, op)
    box = MboxMailbox(path)
    served = messages_of(box)
    if op == "append":
        # Committed: the big message is there, whole; otherwise it is not there at all.
        expected = SMALL + [LARGE] if point == "after-commit" else SMALL
        assert served == expected, f"{len(served)} messages served after a kill at {point}"
    else:
        # The deletion happened whole or not at all (the state database hides a message whose
        # deletion is pending, and recovery deletes it again).
        assert served in (SMALL + [LARGE], SMALL[:1] + SMALL[2:] + [LARGE]), f"{len(served)} messages served"
    # Recovery, as a login runs it: nothing of the crash is left over, nothing served changes.
    with UserState(tmp_path / "state.db") as state:
        recover(box, state)
    leftovers = [p.name for p in tmp_path.iterdir() if re.fullmatch(r"\.mbox\..*\.tmp", p.name)]
    assert leftovers == []
    assert messages_of(MboxMailbox(path)) == served
    assert len(mailbox.mbox(path, create=False)) == len(served)  # the file itself holds no fragment
    # The mailbox goes on working: the next message lands after the committed ones.
    box.add(b"Subject: next\r\n\r\n")
    assert messages_of(MboxMailbox(path)) == served + [b"Subject: next\r\n\r\n"]
