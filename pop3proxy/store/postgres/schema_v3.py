"""Version 3 of the cluster's schema: the OAuth2 tokens (`tokens.PostgresTokenStore`) and the counters of
the failed-login throttle and of sessions per client address (`counters.PostgresCounters`).

The counters' tables are UNLOGGED: they are not written to the WAL (a login costs less), not copied to
standbys, and emptied after the server crashes. Like the throttle of a single machine, which forgets
everything when it restarts: a crash of the server also ended every connection whose owner the rows
were counted for.

Rows counted for someone (attempts in flight, sessions) carry the id of their **owner**: a process,
which holds a session-level advisory lock on that id (a bigint) on a connection of its own for as long
as it lives. `pop3proxy_alive` asks for a shared lock on the id: it cannot be had while the owner holds
its exclusive one, so a dead owner's rows stop counting at once, before anyone deletes them
(`pop3proxy_counters_reap` does, later). Each function is one statement for the client: one round trip.
"""

from __future__ import annotations

from typing import LiteralString

__all__ = ["OWNER_LOST", "VERSION_3"]

# The SQLSTATE a counters function raises when the calling owner holds no lock any more (its connection
# was lost): nothing it would have written would count. The owner takes its lock again and retries.
OWNER_LOST = "P3X01"

_TOKENS: tuple[LiteralString, ...] = (
    # One row per OAuth2 account (a cache id): the record as `TokenStore.save` wrote it (JSON text, kept
    # as text so that a damaged one is read as it is and refused, never rewritten) and the local
    # password's hash. Either may be NULL.
    """CREATE TABLE oauth_tokens (
        account       text PRIMARY KEY,
        record        text,
        password_hash text,
        updated_at    timestamptz NOT NULL DEFAULT now()
    )""",
)

_TABLES: tuple[LiteralString, ...] = (
    # A failed login, three rows: its pair (address, account), its address and its account, each under
    # a 64-bit key (`counters.throttle_keys`); ``at`` in seconds since the epoch.
    """CREATE UNLOGGED TABLE throttle_failures (
        key bigint NOT NULL,
        at  double precision NOT NULL
    )""",
    "CREATE INDEX throttle_failures_key ON throttle_failures (key, at)",
    "CREATE INDEX throttle_failures_at ON throttle_failures (at)",
    # Logins in flight, per key (the pair's and the address's) and owner.
    """CREATE UNLOGGED TABLE throttle_in_flight (
        key      bigint NOT NULL,
        owner    bigint NOT NULL,
        attempts integer NOT NULL,
        PRIMARY KEY (key, owner)
    )""",
    # Sessions per client address and owner.
    """CREATE UNLOGGED TABLE address_sessions (
        address  text NOT NULL,
        owner    bigint NOT NULL,
        sessions integer NOT NULL,
        PRIMARY KEY (address, owner)
    )""",
)

_HELPERS: tuple[LiteralString, ...] = (
    """CREATE FUNCTION pop3proxy_alive(p_owner bigint) RETURNS boolean LANGUAGE sql AS $$
        -- its owner holds the exclusive lock: no shared one for us (taken, it goes with our transaction)
        SELECT NOT pg_try_advisory_xact_lock_shared(p_owner)
    $$""",
    """CREATE FUNCTION pop3proxy_check_owner(p_owner bigint) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT pop3proxy_alive(p_owner) THEN
            RAISE EXCEPTION 'counters owner % holds no lock (its connection was lost)', p_owner
                USING ERRCODE = 'P3X01';
        END IF;
    END $$""",
    """CREATE FUNCTION pop3proxy_now(p_now double precision) RETURNS double precision LANGUAGE sql AS $$
        SELECT coalesce(p_now, extract(epoch FROM clock_timestamp())::double precision)
    $$""",
    # At most p_cap failures are counted: the work is bounded, whatever a key has gathered.
    """CREATE FUNCTION pop3proxy_failures(p_key bigint, p_since double precision, p_cap integer)
    RETURNS integer LANGUAGE sql AS $$
        SELECT count(*)::integer
        FROM (SELECT 1 FROM throttle_failures WHERE key = p_key AND at >= p_since LIMIT p_cap) AS recent
    $$""",
    """CREATE FUNCTION pop3proxy_in_flight(p_key bigint) RETURNS bigint LANGUAGE sql AS $$
        SELECT coalesce(sum(attempts), 0)::bigint FROM throttle_in_flight
        WHERE key = p_key AND pop3proxy_alive(owner)
    $$""",
    """CREATE FUNCTION pop3proxy_give_back(p_owner bigint, p_pair bigint, p_address bigint)
    RETURNS void LANGUAGE sql AS $$
        UPDATE throttle_in_flight SET attempts = attempts - 1
        WHERE owner = p_owner AND key IN (p_pair, p_address);
        DELETE FROM throttle_in_flight
        WHERE owner = p_owner AND key IN (p_pair, p_address) AND attempts <= 0;
    $$""",
)

# Locks, always taken in this order: the address's, then the pair's (advisory, for the transaction).
# Every function that changes an address's rows in flight holds the address's lock first, so two of
# them never wait for each other's rows.
_SESSIONS: tuple[LiteralString, ...] = (
    """CREATE FUNCTION pop3proxy_leave(p_owner bigint, p_address text, p_count integer)
    RETURNS void LANGUAGE sql AS $$
        UPDATE address_sessions SET sessions = sessions - p_count WHERE address = p_address AND owner = p_owner;
        DELETE FROM address_sessions WHERE address = p_address AND owner = p_owner AND sessions <= 0;
    $$""",
    # p_leaving: sessions of this owner that left meanwhile, given back first (in the same step).
    """CREATE FUNCTION pop3proxy_admit(p_owner bigint, p_address text, p_lock bigint, p_max integer,
                                      p_leaving integer) RETURNS boolean LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pop3proxy_check_owner(p_owner);
        PERFORM pg_advisory_xact_lock(p_lock);
        IF p_leaving > 0 THEN
            PERFORM pop3proxy_leave(p_owner, p_address, p_leaving);
        END IF;
        IF (SELECT coalesce(sum(sessions), 0) FROM address_sessions
            WHERE address = p_address AND pop3proxy_alive(owner)) >= p_max THEN
            RETURN false;
        END IF;
        INSERT INTO address_sessions AS held (address, owner, sessions) VALUES (p_address, p_owner, 1)
        ON CONFLICT (address, owner) DO UPDATE SET sessions = held.sessions + 1;
        RETURN true;
    END $$""",
)

_LOGINS: tuple[LiteralString, ...] = (
    """CREATE FUNCTION pop3proxy_login_begin(
        p_owner bigint, p_pair bigint, p_address bigint, p_account bigint, p_now double precision,
        p_window double precision, p_max_failures integer, p_address_failures integer,
        p_max_delay double precision, OUT blocked boolean, OUT delay double precision)
    LANGUAGE plpgsql AS $$
    DECLARE
        since double precision := pop3proxy_now(p_now) - p_window;
        address_failed integer;
    BEGIN
        PERFORM pop3proxy_check_owner(p_owner);
        PERFORM pg_advisory_xact_lock(p_address);
        PERFORM pg_advisory_xact_lock(p_pair);
        address_failed := pop3proxy_failures(p_address, since, p_address_failures);
        -- an address's logins in flight count once it has failed lately (see net/throttle.py)
        blocked := pop3proxy_failures(p_pair, since, p_max_failures) + pop3proxy_in_flight(p_pair)
                       >= p_max_failures
                   OR address_failed + CASE WHEN address_failed > 0 THEN pop3proxy_in_flight(p_address)
                                            ELSE 0 END >= p_address_failures;
        delay := 0;
        IF blocked THEN
            RETURN;
        END IF;
        INSERT INTO throttle_in_flight AS held (key, owner, attempts)
        SELECT k, p_owner, 1 FROM unnest(ARRAY[p_pair, p_address]) AS k ORDER BY k
        ON CONFLICT (key, owner) DO UPDATE SET attempts = held.attempts + 1;
        IF pop3proxy_failures(p_account, since, p_max_failures) >= p_max_failures THEN
            delay := p_max_delay;
        END IF;
    END $$""",
    # A failure replaces its attempt in flight in one step (p_in_flight), and is answered after a delay
    # doubling with the pair's recent failures.
    """CREATE FUNCTION pop3proxy_login_failed(
        p_owner bigint, p_pair bigint, p_address bigint, p_account bigint, p_in_flight boolean,
        p_now double precision, p_window double precision, p_cap integer, p_base_delay double precision,
        p_max_delay double precision) RETURNS double precision LANGUAGE plpgsql AS $$
    DECLARE
        stamp double precision := pop3proxy_now(p_now);
        pair_failed integer;
    BEGIN
        PERFORM pg_advisory_xact_lock(p_address);
        IF p_in_flight THEN
            PERFORM pop3proxy_give_back(p_owner, p_pair, p_address);
        END IF;
        INSERT INTO throttle_failures (key, at) VALUES (p_pair, stamp), (p_address, stamp), (p_account, stamp);
        pair_failed := pop3proxy_failures(p_pair, stamp - p_window, p_cap);
        RETURN least(p_max_delay, p_base_delay * power(2, greatest(0, pair_failed - 1)));
    END $$""",
    # The end of an attempt in flight; a success clears the pair's and the account's failures.
    """CREATE FUNCTION pop3proxy_login_end(p_owner bigint, p_pair bigint, p_address bigint, p_account bigint,
                                          p_ok boolean) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(p_address);
        PERFORM pop3proxy_give_back(p_owner, p_pair, p_address);
        IF p_ok THEN
            DELETE FROM throttle_failures WHERE key = p_pair OR key = p_account;
        END IF;
    END $$""",
    # Bounds the tables: failures older than the window, the oldest beyond p_max_failures, and the rows
    # of dead owners go. One reaper at a time (p_lock); rows someone is changing are left for the next
    # time (SKIP LOCKED): the reaper never waits, so it never takes part in a deadlock.
    """CREATE FUNCTION pop3proxy_counters_reap(p_lock bigint, p_now double precision, p_window double precision,
                                              p_max_failures bigint) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT pg_try_advisory_xact_lock(p_lock) THEN
            RETURN;
        END IF;
        DELETE FROM throttle_failures WHERE ctid IN (
            SELECT ctid FROM throttle_failures WHERE at < pop3proxy_now(p_now) - p_window FOR UPDATE SKIP LOCKED);
        DELETE FROM throttle_failures WHERE ctid IN (
            SELECT ctid FROM throttle_failures ORDER BY at DESC OFFSET p_max_failures FOR UPDATE SKIP LOCKED);
        DELETE FROM throttle_in_flight WHERE ctid IN (
            SELECT ctid FROM throttle_in_flight WHERE NOT pop3proxy_alive(owner) FOR UPDATE SKIP LOCKED);
        DELETE FROM address_sessions WHERE ctid IN (
            SELECT ctid FROM address_sessions WHERE NOT pop3proxy_alive(owner) FOR UPDATE SKIP LOCKED);
    END $$""",
)

VERSION_3: tuple[LiteralString, ...] = _TOKENS + _TABLES + _HELPERS + _SESSIONS + _LOGINS
