"""The proxy's promises under faults.

* Crashes: the proxy process is killed (SIGKILL) at random points of a sync of many messages from
  the real Dovecot, restarted, and synced to the end; every message exists exactly once across the
  provider and the cache — never lost, never duplicated, never a fragment — for both cache backends
  under every deletion policy (one proxy per backend and policy, side by side). Run with -s for the
  count of kills and messages checked.
* ``upstream.delete_after_days`` with the real Dovecot.
* A full disk under the cache (a small tmpfs).

A misbehaving provider is tested in test_faulty_provider.py. The proxy is always a real
``pop3proxy serve`` process and the clients are poplib.
"""

from __future__ import annotations

import os
import poplib
import random
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from helpers.common import HOST
from helpers.faults import cache_rows, check_copies, check_final, login_in_background, open_claims, provider_messages
from helpers.proxy import Proxy, cached, retr_all, sample

from pop3proxy.store.paths import user_dir


# --- crash consistency ----------------------------------------------------------------------------

CRASH_MESSAGES = 40  # a sync long enough that most kills in the random window land in the middle of it
CRASH_SIZE = 10_000
CRASH_BIG = 2_000_000  # one message this big, so that kills also land in the middle of writing one
CRASH_ROUNDS = int(os.environ.get("POP3PROXY_CRASH_ROUNDS", "20"))  # per backend and deletion policy
CRASH_WINDOW = 0.8  # seconds after the login starts in which the kill falls
POLICIES = ("mirror", "after_fetch", "never")
BACKENDS = ("maildir", "mbox")


@dataclass
class CrashReport:
    backend: str
    policy: str
    kills: int = 0
    mid_sync: int = 0  # kills that left the cache partly filled
    claims: int = 0  # kills that left a message claimed ('fetching') but not finished
    checked: int = 0  # messages checked, over all the checks
    delays: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.backend}/{self.policy}: {self.kills} kills ({self.mid_sync} in the middle of the sync, {self.claims} with a "
            f"message claimed but not finished), {self.checked} messages checked"
        )


def crash_rounds(proxy: Proxy, dovecot, user: str, password: str, backend: str, policy: str,
                 rng: random.Random) -> CrashReport:
    """CRASH_ROUNDS times: fill the provider, log in, SIGKILL the proxy mid-sync, restart, sync to the end."""
    report = CrashReport(backend, policy)
    originals = [sample(i, CRASH_BIG if i == CRASH_MESSAGES // 4 else CRASH_SIZE) for i in range(CRASH_MESSAGES)]
    config = {"upstream": {"delete": policy}, "sync": {"login_budget": 60}}
    proxy.start(**config)
    try:
        for round_ in range(CRASH_ROUNDS):
            # Every round starts from an empty cache and the provider holding all the messages.
            shutil.rmtree(user_dir(proxy.root, user), ignore_errors=True)
            if not provider_messages(dovecot, user):
                for m in originals:
                    dovecot.deliver(user, m)
            assert provider_messages(dovecot, user) == originals
            delay = rng.uniform(0, CRASH_WINDOW)
            report.delays.append(round(delay, 3))
            thread = login_in_background(proxy.process.port, user, password)
            time.sleep(delay)
            process = proxy.process
            proxy.kill()
            report.logs.append(process.output())
            report.kills += 1
            thread.join(10)
            # Right after the crash: nothing lost, nothing twice, no fragment in the cache.
            cache = cached(proxy, user, backend)
            for problem in check_copies(originals, provider_messages(dovecot, user), cache):
                report.problems.append(f"round {round_}, killed after {delay:.3f} s: {problem}")
            report.mid_sync += 0 < len(cache) < CRASH_MESSAGES
            report.claims += open_claims(proxy.root, user) > 0
            report.checked += len(originals)
            # Restart; a login with a generous budget finishes the sync (and QUITs upstream).
            proxy.start(**config)
            client = proxy.client(user, password)
            count, _ = client.stat()
            uids = {line.split()[1] for line in client.uidl()[1]}
            client.quit()
            if count != CRASH_MESSAGES or len(uids) != CRASH_MESSAGES:
                report.problems.append(f"round {round_}: the client saw {count} messages, {len(uids)} uids")
            for problem in check_final(policy, originals, provider_messages(dovecot, user),
                                       cached(proxy, user, backend)):
                report.problems.append(f"round {round_}, killed after {delay:.3f} s, synced again: {problem}")
            home = user_dir(proxy.root, user)
            leftovers = [str(p.relative_to(home)) for p in home.rglob("*")
                         if p.is_file() and (p.name.endswith(".tmp") or p.parent.name == "tmp")]
            if leftovers:
                report.problems.append(f"round {round_}: left over after recovery: {leftovers[:5]}")
            statuses = Counter(row.status for row in cache_rows(proxy.root, user))
            if statuses != Counter({"cached": CRASH_MESSAGES}):
                report.problems.append(f"round {round_}: state rows {dict(statuses)}")
            report.checked += len(originals)
    finally:
        if proxy.process is not None:
            report.logs.append(proxy.output())
        proxy.stop()
    return report


@pytest.mark.dovecot
def test_kill_during_sync_loses_and_duplicates_nothing(server_process, tmp_path, dovecot):
    # One proxy per backend and deletion policy, side by side (each with its own provider user and cache).
    seed = random.randrange(1 << 32)
    combos = [(backend, policy) for backend in BACKENDS for policy in POLICIES]
    users = [(dovecot.user, dovecot.password)] + [dovecot.new_user() for _ in combos[1:]]
    started = time.monotonic()
    with ThreadPoolExecutor(len(combos)) as pool:
        futures = []
        for (backend, policy), (user, password) in zip(combos, users):
            (tmp_path / backend / policy).mkdir(parents=True)
            proxy = Proxy(server_process, tmp_path / backend / policy, dovecot, cache={"backend": backend})
            rng = random.Random(f"{seed}-{backend}-{policy}")
            futures.append(pool.submit(crash_rounds, proxy, dovecot, user, password, backend, policy, rng))
        reports = [future.result() for future in futures]
    summary = (
        f"crash test (seed {seed}, {time.monotonic() - started:.0f} s): {sum(r.kills for r in reports)} kills, "
        f"{sum(r.checked for r in reports)} messages checked; " + "; ".join(r.summary() for r in reports)
    )
    print(summary)
    for report in reports:
        details = (f"{summary}\n{report.backend}/{report.policy} kill delays {report.delays}:\n"
                   + "\n".join(report.problems[:20]))
        assert report.kills >= CRASH_ROUNDS and not report.problems, details
    for backend in BACKENDS:
        assert sum(r.mid_sync for r in reports if r.backend == backend) >= 1, f"no kill interrupted a sync: {summary}"
    for report, (_, password) in zip(reports, users):
        assert not any(password in log for log in report.logs), "a password reached the log"


# --- delete_after_days ----------------------------------------------------------------------------


@pytest.fixture
def dovecot_proxy(server_process, tmp_path, dovecot):
    made = Proxy(server_process, tmp_path, dovecot)
    yield made
    output = made.output()
    made.stop()
    assert dovecot.password not in output, "a password reached the log"


@pytest.mark.dovecot
def test_delete_after_days_zero_deletes_fetched_mail_at_the_next_sync(dovecot_proxy, dovecot):
    proxy = dovecot_proxy
    first = [sample(i) for i in range(2)]
    for m in first:
        dovecot.deliver(dovecot.user, m)
    proxy.start(upstream={"delete": "never", "delete_after_days": 0})
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == first
    client.quit()
    assert provider_messages(dovecot, dovecot.user) == first  # fetched now, old only from now on
    later = sample(2)
    dovecot.deliver(dovecot.user, later)
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == first + [later]
    client.quit()
    assert provider_messages(dovecot, dovecot.user) == [later]
    assert cached(proxy, dovecot.user) == first + [later]
    client = proxy.client(dovecot.user, dovecot.password)
    assert retr_all(client) == first + [later]
    client.quit()
    assert provider_messages(dovecot, dovecot.user) == []
    assert cached(proxy, dovecot.user) == first + [later]


# --- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs; grow() makes it 64 MiB."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (this test needs root): {done.stderr.strip()}")

    class Disk:
        path = mount_point

        @staticmethod
        def grow() -> None:
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)], check=True)

    try:
        yield Disk
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.dovecot
def test_full_disk_loses_nothing_and_recovers(tiny_disk, dovecot_proxy, dovecot):  # proxy stops, then umount
    proxy = dovecot_proxy
    proxy.root = tiny_disk.path / "cache"
    originals = [sample(i, 100_000) for i in range(30)]  # 3 MB for 2 MiB of disk
    for m in originals:
        dovecot.deliver(dovecot.user, m)
    proxy.start(upstream={"delete": "after_fetch"}, sync={"login_budget": 30})
    client = poplib.POP3(HOST, proxy.process.port, timeout=30)
    client.user(dovecot.user)
    try:
        reply = client.pass_(dovecot.password)
    except poplib.error_proto as exc:
        refusal = exc.args[0]
        assert isinstance(refusal, bytes) and refusal.startswith(b"-ERR [SYS/TEMP]"), proxy.output()[-3000:]
    else:  # served what fits
        served = retr_all(client)
        assert served and len(served) < len(originals) and Counter(served) <= Counter(originals), reply
    client.quit()
    assert proxy.process.proc.poll() is None, "the proxy died:\n" + proxy.output()[-3000:]
    upstream, cache = provider_messages(dovecot, dovecot.user), cached(proxy, dovecot.user)
    assert len(cache) < len(originals)
    assert check_copies(originals, upstream, cache) == []
    # Nothing that is not cached was deleted upstream.
    assert all(m in upstream for m in originals if m not in cache)
    tiny_disk.grow()
    client = proxy.client(dovecot.user, dovecot.password)
    assert Counter(retr_all(client)) == Counter(originals)
    client.quit()
    upstream, cache = provider_messages(dovecot, dovecot.user), cached(proxy, dovecot.user)
    assert check_final("after_fetch", originals, upstream, cache) == []
