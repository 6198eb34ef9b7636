"""The built-in classifier: measured accuracy on a labelled corpus, the token store, ``pop3proxy train``.

The corpus (tests/data/spam, written by make_corpus.py there) has a training set and a disjoint
test set; the classifier learns from the first and is measured on the second.
"""

from __future__ import annotations

import base64
import importlib.util
import mailbox
import sqlite3
from pathlib import Path

import pytest
from helpers.daemons import GTUBE
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3proxy.filtering.api import FilterContext
from pop3proxy.filtering.loader import load_filter
from pop3proxy.filters._bayes import (
    Bayes,
    chi2q,
    combine,
    iter_messages,
    tokens,
    train_command,
    word_probability,
)
from pop3proxy.filters.spam import SpamFilter, bayes_rules

DATA = Path(__file__).resolve().parents[1] / "data" / "spam"
TRAIN = {label: DATA / "train" / f"{label}.mbox" for label in ("spam", "ham")}
TEST = {label: DATA / "test" / f"{label}.mbox" for label in ("spam", "ham")}
NORMAL = (
    b"From: Anna Berg <anna.berg@example.org>\r\nTo: Ben Costa <ben.costa@example.net>\r\n"
    b"Subject: Notes from the planning meeting\r\nDate: Mon, 3 Jun 2024 09:11:58 +0000\r\n"
    b"Message-ID: <20240603091158.4711@example.org>\r\n\r\n"
    b"Hi Ben,\r\n\r\nthe notes from today's meeting are in the shared folder. We agreed to move the\r\n"
    b"release to Thursday and to review the migration script together tomorrow.\r\n\r\nBest,\r\nAnna\r\n"
)
GTUBE_MESSAGE = b"From: x@example.com\r\nSubject: test\r\n\r\n" + GTUBE + b"\r\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Bayes:
    bayes = Bayes(tmp_path_factory.mktemp("bayes") / "bayes.sqlite")
    stats = bayes.train([TRAIN["spam"]], [TRAIN["ham"]])
    assert stats.learned["spam"] > 100 and stats.learned["ham"] > 100
    return bayes


def messages(path: Path) -> list[bytes]:
    return [data for _, data in iter_messages([path])]


def test_corpus_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("make_corpus", DATA / "make_corpus.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, data in module.corpus().items():
        assert (DATA / name).read_bytes() == data, f"{name} differs: run tests/data/spam/make_corpus.py"


def test_train_and_test_sets_are_disjoint() -> None:
    train = {m for path in TRAIN.values() for m in messages(path)}
    test = {m for path in TEST.values() for m in messages(path)}
    assert len(test) >= 100 and not train & test


def test_accuracy_on_held_out_mail(trained: Bayes) -> None:
    flt = SpamFilter(SpamFilter.Config(database=str(trained.path)))
    outcomes = {label: [flt(m, FilterContext("alice", "u")) for m in messages(TEST[label])] for label in TEST}
    flagged = {label: sum(b"X-Spam-Flag: YES" in o.data for o in outcomes[label]) for label in TEST}
    true_positives, false_positives = flagged["spam"], flagged["ham"]
    false_negatives = len(outcomes["spam"]) - true_positives
    precision = true_positives / max(1, true_positives + false_positives)
    recall = true_positives / (true_positives + false_negatives)
    print(
        f"\nbuiltin Bayes on {len(outcomes['spam'])} spam + {len(outcomes['ham'])} ham held out: "
        f"precision {precision:.3f}, recall {recall:.3f} "
        f"(tp {true_positives}, fp {false_positives}, fn {false_negatives})"
    )
    assert precision >= 0.9 and recall >= 0.9
    # The probabilities are decisive, not hovering near the threshold.
    probabilities = {label: [trained.score(m) for m in messages(TEST[label])] for label in TEST}
    assert sorted(probabilities["spam"])[len(probabilities["spam"]) // 10] > 0.9
    assert sorted(probabilities["ham"])[-len(probabilities["ham"]) // 10] < 0.1


def test_trained_headers(trained: Bayes) -> None:
    flt = SpamFilter(SpamFilter.Config(database=str(trained.path)))
    spam = messages(TEST["spam"])[0]
    outcome = flt(spam, FilterContext("alice", "u"))
    assert outcome.data.endswith(spam)
    added = outcome.data[: len(outcome.data) - len(spam)].decode()
    assert added.startswith("X-Spam-Flag: YES\nX-Spam-Score: ")  # the corpus has LF line endings
    assert "tests=BAYES_99" in added and "required=5.0" in added
    ham = messages(TEST["ham"])[0]
    ham_added = flt(ham, FilterContext("alice", "u")).data[: -len(ham)].decode()
    assert "X-Spam-Status: No, score=-" in ham_added and "tests=BAYES_00" in ham_added


def test_quarantine_and_per_user_with_builtin(trained: Bayes) -> None:
    flt, _ = load_filter(
        {"use": "spam", "database": str(trained.path), "action": "quarantine", "per_user": {"bob": 11.0}}
    )
    spam = messages(TEST["spam"])[1]
    assert flt(spam, FilterContext("alice", "u")).action == "quarantine"
    assert flt(spam, FilterContext("bob", "u")).action == "deliver"  # +10 is the most Bayes alone gives


def test_untrained_store_detects_gtube_and_passes_normal_mail(tmp_path, caplog) -> None:
    for database in (tmp_path / "missing.sqlite", tmp_path / "empty.sqlite"):
        if database.name == "empty.sqlite":
            Bayes(database).train_messages()  # the schema, and nothing learned
            assert database.exists()
        caplog.clear()
        flt, _ = load_filter({"use": "spam", "database": str(database)})
        # A store that is not there is worth a word at startup (a misspelt path, say).
        assert (f"{database} does not exist" in caplog.text) == (database.name == "missing.sqlite")
        spam = flt(GTUBE_MESSAGE, FilterContext("alice", "u"))
        assert spam.data.startswith(b"X-Spam-Flag: YES\r\nX-Spam-Score: 1000.0\r\n")
        assert b"tests=GTUBE\r\n" in spam.data
        ham = flt(NORMAL, FilterContext("alice", "u"))
        assert ham.verdict == "ham, score 0.0/5.0, Bayes not used: trained on 0 spam and 0 ham"
        assert ham.data == (
            b"X-Spam-Score: 0.0\r\nX-Spam-Level: \r\nX-Spam-Status: No, score=0.0 required=5.0 tests=none\r\n"
            + NORMAL
        )


def test_gtube_in_base64_is_found(tmp_path) -> None:
    encoded = (
        b"From: x@example.com\r\nSubject: t\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(GTUBE)
    )
    flt = SpamFilter(SpamFilter.Config(database=str(tmp_path / "none.sqlite")))
    assert b"X-Spam-Flag: YES" in flt(encoded, FilterContext("a", "u")).data


def test_too_little_training_is_not_used(tmp_path) -> None:
    bayes = Bayes(tmp_path / "few.sqlite")
    bayes.train_messages(spam=messages(TRAIN["spam"])[:3], ham=messages(TRAIN["ham"])[:3])
    spam = messages(TEST["spam"])[0]
    few = SpamFilter(SpamFilter.Config(database=str(bayes.path)))
    assert b"tests=none" in few(spam, FilterContext("a", "u")).data
    enough = SpamFilter(SpamFilter.Config(database=str(bayes.path), min_trained=3))
    assert b"BAYES_" in enough(spam, FilterContext("a", "u")).data


def test_training_twice_counts_once_and_relabelling_moves(tmp_path) -> None:
    bayes = Bayes(tmp_path / "b.sqlite")
    spam, ham = messages(TRAIN["spam"])[:5], messages(TRAIN["ham"])[:5]
    bayes.train_messages(spam=spam, ham=ham)
    again = bayes.train_messages(spam=spam, ham=ham)
    assert again.known == {"spam": 5, "ham": 5} and bayes.counts() == (5, 5)
    moved = bayes.train_messages(ham=spam[:2])
    assert moved.relabelled["ham"] == 2 and bayes.counts() == (3, 7)
    with sqlite3.connect(bayes.path) as db:
        word = sorted(tokens(spam[0]))[0]
        spam_count, ham_count = db.execute("SELECT spam, ham FROM tokens WHERE token = ?", (word,)).fetchone()
    assert ham_count >= 1 and spam_count >= 0


def test_tokens_decode_mime() -> None:
    qp = (
        b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.com>\r\nSubject: =?utf-8?b?R3LDvMOfZQ==?=\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Sch=C3=B6ne Gr=C3=BC=C3=9Fe aus K=C3=B6ln\r\n--b\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(b'<p>Visit <a href="http://www.shop.example/x">our SHOP</a> &amp; more</p>')
        + b"--b\r\nContent-Type: application/pdf; name=\"a.pdf\"\r\nContent-Disposition: attachment; "
        b"filename=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b--\r\n"
    )
    found = tokens(qp)
    assert {"schöne", "grüße", "köln", "visit", "shop", "more"} <= found
    assert {"subject:grüße", "from:jürgen", "from:@example.com", "url:www.shop.example", "url:shop.example"} <= found
    assert {"ctype:application/pdf", "filename:.pdf", "cte:quoted-printable"} <= found
    assert not any(t.startswith("<") or t == "href" for t in found)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400))
def test_tokens_never_fail(data: bytes) -> None:
    assert isinstance(tokens(data), set)


def test_combining_math() -> None:
    assert chi2q(0.0, 2) == 1.0 and 0 < chi2q(10.0, 4) < 0.05
    assert combine([]) == 0.5 and combine([0.5, 0.55]) == 0.5  # nothing telling
    assert combine([0.99] * 20) > 0.99 and combine([0.01] * 20) < 0.01
    assert 0.3 < combine([0.99] * 10 + [0.01] * 10) < 0.7  # mixed evidence: unsure
    assert word_probability(0, 0, 10, 10) == 0.5
    assert word_probability(10, 0, 10, 10) > 0.95 and word_probability(0, 10, 10, 10) < 0.05
    assert word_probability(1, 0, 10, 10) < word_probability(10, 0, 10, 10)  # rare words count less
    assert bayes_rules(0.0) == ["BAYES_00"] and bayes_rules(0.5) == ["BAYES_50"]
    assert bayes_rules(0.995) == ["BAYES_99"] and bayes_rules(1.0) == ["BAYES_99", "BAYES_999"]


# -- pop3proxy train ----------------------------------------------------------------------------


def maildir(root: Path, items: list[bytes]) -> Path:
    box = mailbox.Maildir(root, create=True)
    for data in items:
        box.add(data)
    (root / "dovecot-uidlist").write_text("3 V1 N5\n")  # not a message: skipped
    (root / "tmp" / "1.partial").write_bytes(items[0])  # a delivery in progress: left out
    return root


def test_train_command_from_mbox_and_maildir(tmp_path, capsys) -> None:
    db = tmp_path / "db" / "bayes.sqlite"
    ham_dir = maildir(tmp_path / "ham", messages(TRAIN["ham"])[:30])
    code = train_command(["--spam", str(TRAIN["spam"]), "--ham", str(ham_dir), "--database", str(db)])
    out = capsys.readouterr()
    assert code == 0, out.err
    spam_count = len(messages(TRAIN["spam"]))
    assert f"spam: {spam_count} messages: {spam_count} learned, 0 moved from ham, 0 already known" in out.out
    assert "ham: 30 messages: 30 learned" in out.out
    assert "skipped 1 files that are not messages" in out.out and "dovecot-uidlist" in out.out
    assert out.out.rstrip().endswith(f"{db}: {spam_count} spam and 30 ham messages trained")
    assert Bayes(db).counts() == (spam_count, 30)
    code = train_command(["--ham", str(ham_dir), "--database", str(db)])
    assert code == 0 and "ham: 30 messages: 0 learned, 0 moved from spam, 30 already known" in capsys.readouterr().out


def test_train_command_single_files(tmp_path, capsys) -> None:
    one = tmp_path / "one.eml"
    one.write_bytes(messages(TRAIN["spam"])[0])
    db = tmp_path / "b.sqlite"
    assert train_command(["--spam", str(one), "--database", str(db)]) == 0
    assert Bayes(db).counts() == (1, 0)


@pytest.mark.parametrize(
    "argv, error",
    [
        ([], "give --spam PATH and/or --ham PATH"),
        (["--spam", "/nonexistent/spam"], "--spam /nonexistent/spam: no such file or directory"),
        (["--ham"], "argument --ham: expected one argument"),
        (["--bogus", "x"], "unrecognized arguments: --bogus x"),
        (["--spam", "{empty}"], "--spam {empty}: no messages found"),
        (["--spam", "{data}", "--database", "{blocked}/b.sqlite"], "{blocked}/b.sqlite: "),
    ],
)
def test_train_command_errors(tmp_path, capsys, argv, error) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not mail\n")
    blocked = tmp_path / "file"
    blocked.write_text("a file where a directory should be")
    names = {"empty": empty, "data": TRAIN["spam"], "blocked": blocked}
    argv = [a.format(**names) for a in argv]
    code = train_command(argv + ([] if "--database" in argv else ["--database", str(tmp_path / "b.sqlite")]))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("pop3proxy train: ") and err.count("\n") == 1, err
    assert error.format(**names) in err


def test_train_command_help(capsys) -> None:
    assert train_command(["--help"]) == 0
    assert "usage: pop3proxy train" in capsys.readouterr().out


def test_failed_training_stores_nothing(tmp_path) -> None:
    db = tmp_path / "b.sqlite"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_command(["--spam", str(TRAIN["spam"]), "--ham", str(empty), "--database", str(db)]) == 2
    assert Bayes(db).counts() == (0, 0)


def test_default_database_follows_xdg(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert train_command(["--spam", str(TRAIN["spam"])]) == 0
    assert Bayes(tmp_path / "data" / "pop3proxy" / "bayes.sqlite").counts()[0] > 100
    flt = SpamFilter(SpamFilter.Config())
    assert flt.bayes is not None and flt.bayes.path == tmp_path / "data" / "pop3proxy" / "bayes.sqlite"


def test_the_builtin_check_parses_each_message_once(trained: Bayes, monkeypatch) -> None:
    # The GTUBE look and the tokens read one reading of the message's parts (it was parsed twice).
    from pop3proxy.filters import _tokens
    from pop3proxy.filters import spam as spam_module

    flt, _ = load_filter({"use": "spam", "database": str(trained.path)})
    sample = messages(TEST["spam"])[1]
    before = flt(sample, FilterContext("alice", "u"))
    calls = []
    real = _tokens.parse
    monkeypatch.setattr(spam_module, "parse", lambda data: calls.append(1) or real(data))
    monkeypatch.setattr(_tokens, "parse", lambda data: calls.append(1) or real(data))
    after = flt(sample, FilterContext("alice", "u"))
    assert len(calls) == 1
    assert after.data == before.data and after.action == before.action
