"""``python -m bench.time_tokens``: the built-in spam filter's tokens and check, timed against the reference.

The reference is the tokenizer that parsed every message with ``email.message_from_bytes(...,
policy=compat32)``, kept in tests/helpers/bayes_reference.py (the test suite checks that both give the
same tokens). The corpus is 300 messages of 20 KB in each of the benchmark's two shapes
(bench/bench_mail.py): ``message`` (one base64 attachment) and ``multipart_message`` (a text part and
an attachment, one in ten an .exe: workload 8's). Printed: CPU milliseconds per message, best of five
passes, for ``tokens()`` and for the spam filter's whole ``check`` (builtin backend) with no trained
store (as workload 8 runs it) and with a store trained on tests/data/spam/train.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from bench import bench_mail as mail
from pop3proxy.filtering.api import FilterContext
from pop3proxy.filters import _bayes, _tokens
from pop3proxy.filters import spam as spam_module
from pop3proxy.filters.spam import SpamFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import bayes_reference as reference  # noqa: E402

COUNT, SIZE, PASSES = 300, 20_000, 5


def per_message(corpus: list[bytes], call: Callable[[bytes], object]) -> float:
    best = float("inf")
    for _ in range(PASSES):
        started = time.process_time()
        for data in corpus:
            call(data)
        best = min(best, time.process_time() - started)
    return best / len(corpus) * 1000


@contextmanager
def old_code() -> Iterator[None]:
    """The spam filter as it was: the reference parse, GTUBE look and tokens."""
    with mock.patch.object(spam_module, "parse", reference.parse), \
            mock.patch.object(spam_module, "has_gtube", reference.has_gtube), \
            mock.patch.object(_bayes, "tokens", reference.tokens):
        yield


def check_costs(corpus: list[bytes], database: Path) -> tuple[float, float]:
    flt = SpamFilter(SpamFilter.Config(database=str(database)))
    context = FilterContext(user="bench", uid="1")
    with old_code():
        before = per_message(corpus, lambda data: flt.check(data, context))
    return before, per_message(corpus, lambda data: flt.check(data, context))


def main() -> None:
    logging.disable(logging.WARNING)  # the untrained store's notice
    corpora = {
        "attachment only (bench_mail.message)": [mail.message(SIZE, i) for i in range(COUNT)],
        "text + attachment (workload 8)": [
            mail.multipart_message(SIZE, i, dangerous=i % 10 == 0) for i in range(COUNT)
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        trained = _bayes.Bayes(Path(tmp) / "trained.sqlite")
        train = REPO / "tests" / "data" / "spam" / "train"
        trained.train([train / "spam.mbox"], [train / "ham.mbox"])
        for name, corpus in corpora.items():
            assert all(_tokens.tokens(m) == reference.tokens(m) for m in corpus)
            print(f"{COUNT} × {SIZE // 1000} KB, {name}: ms per message, before -> after")
            before, after = per_message(corpus, reference.tokens), per_message(corpus, _tokens.tokens)
            print(f"  tokens():                 {before:.3f} -> {after:.3f}")
            before, after = check_costs(corpus, Path(tmp) / "untrained.sqlite")
            print(f"  check, no trained store:  {before:.3f} -> {after:.3f}")
            before, after = check_costs(corpus, trained.path)
            print(f"  check, trained store:     {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
