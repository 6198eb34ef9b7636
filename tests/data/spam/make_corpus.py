"""Write the labelled test corpus for the built-in spam classifier (tests/test_bayes.py).

    python tests/data/spam/make_corpus.py      # rewrites train/ and test/ beside this file

Synthetic but shaped like real mail. Ham: work mail, mailing-list posts, notes between friends
and family, shop and bank notifications, shop promotions, newsletters. Spam: pharmacy, loans,
advance-fee fraud, phishing, crypto schemes, dating, SEO offers, parcel scams, diet pills, replica
watches, and business-email fraud written like office mail. Each message is assembled from a
template with words and phrases drawn at random, in plain text, HTML, multipart/alternative,
quoted-printable or base64, so the classifier has to decode MIME to see the words. Ham and spam
share much vocabulary on purpose (account, offer, order, payment, free, click, unsubscribe). The
random seed is fixed: the output is the same every time, and
tests/test_bayes.py checks that the committed files are what this script writes.

train/ and test/ hold disjoint messages (separate random streams), as mboxrd files ham.mbox and
spam.mbox.

The names, subjects and phrases the messages are drawn from are in corpus_words.py beside this file.
"""

from __future__ import annotations

import base64
import quopri
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script, or loaded by path (tests/unit/test_bayes.py)
    sys.path.insert(0, str(HERE))

from corpus_words import (  # noqa: E402
    CITIES,
    DAYS,
    FIRST,
    GIRLS,
    HAM_DOMAINS,
    HAM_MAILERS,
    LAST,
    LISTS,
    LIST_LINES,
    LIST_TOPICS,
    MONTHS,
    NEWS_LINES,
    NEWS_SUBJECTS,
    PERSONAL_LINES,
    PERSONAL_SUBJECTS,
    PROJECTS,
    PROMO_LINES,
    PROMO_SUBJECTS,
    SHOPS,
    SHOP_LINES,
    SHOP_SUBJECTS,
    SPAM,
    SPAM_CLOSERS,
    SPAM_DOMAINS,
    SPAM_FOOTERS,
    SPAM_MAILERS,
    WEEKDAYS,
    WORK_LINES,
    WORK_SUBJECTS,
)

SIZES = {"train": 110, "test": 60}
SEEDS = {"train": 1709, "test": 4242}


class Maker:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.serial = 0

    def pick(self, seq):
        return self.r.choice(seq)

    def person(self) -> tuple[str, str]:
        first, last = self.pick(FIRST), self.pick(LAST)
        return f"{first} {last}", f"{first.lower()}.{last.lower()}"

    def fill(self, text: str, **extra: str) -> str:
        r = self.r
        values = {
            "project": self.pick(PROJECTS), "day": self.pick(DAYS),
            "time": f"{r.randint(8, 17)}:{r.choice(['00', '15', '30', '45'])}",
            "city": self.pick(CITIES), "order": f"{r.choice('ABCDEFGHKLMNPRSTWXZ')}{r.randint(100000, 999999)}",
            "amount": f"{r.randint(5, 480)}.{r.randint(0, 99):02d}", "date": self.date_text(),
            "month": self.pick(MONTHS), "seat": r.randint(11, 88), "shop": self.pick(SHOPS)[0],
            "price": f"${r.randint(1, 99)}.{r.choice(['95', '99', '49'])}",
            "big": f"{r.randint(2, 950)},{r.randint(0, 999):03d}",
            "small": r.choice(["250", "99", "49", "500"]), "pct": r.randint(12, 95),
            "name": " ".join(self.person()[0].split()),
            "girl": self.pick(GIRLS), "domain": self.pick(HAM_DOMAINS), "url": self.spam_url(),
        }
        values.update(extra)
        return text.format(**values)

    def date_text(self) -> str:
        r = self.r
        return f"{r.randint(1, 28)} {self.pick(MONTHS)[:3]} 2024"

    def date_header(self) -> str:
        r = self.r
        return (f"{self.pick(WEEKDAYS)}, {r.randint(1, 28)} {self.pick(MONTHS)[:3]} 2024 "
                f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d} "
                f"{r.choice(['+0000', '+0100', '+0200', '-0500'])}")

    def spam_url(self) -> str:
        r = self.r
        path = "".join(r.choice("abcdefghijkmnpqrstuvwxyz0123456789") for _ in range(r.randint(5, 12)))
        return f"http://{self.pick(SPAM_DOMAINS)}/{r.choice(['go', 'c', 'l', 'offer', 'verify'])}/{path}"

    def message_id(self, domain: str) -> str:
        self.serial += 1
        return f"<{self.r.getrandbits(48):012x}.{self.serial}@{domain}>"

    def paragraph(self, lines: list[str], lo: int, hi: int, **extra: str) -> str:
        chosen = self.r.sample(lines, k=min(len(lines), self.r.randint(lo, hi)))
        return " ".join(self.fill(line, **extra) for line in chosen)

    # -- assembling ------------------------------------------------------------------------------

    def build(self, headers: list[tuple[str, str]], text: str, html_text: str | None, style: str,
              mailer: str | None, attachment: tuple[str, str, bytes] | None = None) -> bytes:
        if mailer:
            headers.append(("X-Mailer", mailer))
        headers.append(("MIME-Version", "1.0"))
        boundary = f"=_b{self.r.getrandbits(40):010x}"
        if attachment is not None:
            name, ctype, data = attachment
            inner = self.part(text, "text/plain", style)
            att = (f"Content-Type: {ctype}; name=\"{name}\"\nContent-Disposition: attachment; filename=\"{name}\"\n"
                   f"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(data).decode())
            body = f"--{boundary}\n{inner}\n--{boundary}\n{att}\n--{boundary}--\n"
            return self.render(headers + [("Content-Type", f"multipart/mixed; boundary=\"{boundary}\"")], body)
        if html_text is None:
            part = self.part(text, "text/plain", style)
            head, _, body = part.partition("\n\n")
            extra = [tuple(line.split(": ", 1)) for line in head.split("\n")]
            return self.render(headers + extra, body)  # type: ignore[arg-type]
        if style == "html-only":
            part = self.part(html_text, "text/html", "qp" if self.r.random() < 0.5 else "8bit")
            head, _, body = part.partition("\n\n")
            extra = [tuple(line.split(": ", 1)) for line in head.split("\n")]
            return self.render(headers + extra, body)  # type: ignore[arg-type]
        plain = self.part(text, "text/plain", style)
        rich = self.part(html_text, "text/html", style)
        body = f"--{boundary}\n{plain}\n--{boundary}\n{rich}\n--{boundary}--\n"
        return self.render(headers + [("Content-Type", f"multipart/alternative; boundary=\"{boundary}\"")], body)

    def part(self, text: str, ctype: str, style: str) -> str:
        charset = "utf-8"
        if style == "base64":
            payload = base64.encodebytes(text.encode(charset)).decode()
            cte = "base64"
        elif style == "qp":
            payload = quopri.encodestring(text.encode(charset)).decode()
            cte = "quoted-printable"
        else:
            payload, cte = text, "8bit"
        return f"Content-Type: {ctype}; charset=\"{charset}\"\nContent-Transfer-Encoding: {cte}\n\n{payload}"

    @staticmethod
    def render(headers: list[tuple[str, str]], body: str) -> bytes:
        head = "".join(f"{name}: {value}\n" for name, value in headers)
        if not body.endswith("\n"):
            body += "\n"
        return (head + "\n" + body).encode("utf-8")

    @staticmethod
    def wrap(text: str, width: int = 72) -> str:
        out, line = [], ""
        for word in text.split():
            if line and len(line) + 1 + len(word) > width:
                out.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        if line:
            out.append(line)
        return "\n".join(out)

    def style(self) -> str:
        return self.r.choices(["8bit", "qp", "base64"], weights=[6, 2, 2])[0]

    # -- ham ----------------------------------------------------------------------------------------

    def ham(self) -> bytes:
        kind = self.r.choices(["work", "list", "personal", "shop", "news", "promo"], weights=[4, 3, 3, 2, 1, 2])[0]
        sender_name, local = self.person()
        to_name, to_local = self.person()
        domain = self.pick(HAM_DOMAINS)
        to = f"{to_name} <{to_local}@{self.pick(HAM_DOMAINS)}>"
        headers: list[tuple[str, str]] = []
        html_text = None
        attachment = None
        if kind == "work":
            subject = self.fill(self.pick(WORK_SUBJECTS))
            body = (f"Hi {to_name.split()[0]},\n\n{self.wrap(self.paragraph(WORK_LINES, 2, 4))}\n\n"
                    f"{self.wrap(self.paragraph(WORK_LINES, 1, 3))}\n\nBest,\n{sender_name.split()[0]}\n")
            if self.r.random() < 0.15:
                attachment = ("figures.csv", "text/csv", f"month,value\nJan,{self.r.randint(1, 99)}\n".encode())
        elif kind == "list":
            name, desc = self.pick(LISTS)
            subject = f"[{name}] " + ("Re: " if self.r.random() < 0.6 else "") + self.pick(LIST_TOPICS)
            body = (f"On {self.pick(DAYS)}, {self.person()[0]} wrote:\n> {self.pick(LIST_LINES)}\n\n"
                    f"{self.wrap(self.paragraph(LIST_LINES, 2, 4))}\n\n-- \n{sender_name}\n\n"
                    f"_______________________________________________\n{name} mailing list\n"
                    f"To unsubscribe send an email to {name}-leave@lists.example.org\n")
            headers += [("List-Id", f"{desc} <{name}.lists.example.org>"), ("Precedence", "list")]
            to = f"{name}@lists.example.org"
        elif kind == "personal":
            subject = self.fill(self.pick(PERSONAL_SUBJECTS))
            body = (f"Hey {to_name.split()[0]},\n\n{self.wrap(self.paragraph(PERSONAL_LINES, 2, 4))}\n\n"
                    f"Hugs,\n{sender_name.split()[0]}\n")
        elif kind == "shop":
            shop, shop_domain = self.pick(SHOPS)
            domain, sender_name, local = shop_domain, shop, "no-reply"
            subject = self.fill(self.pick(SHOP_SUBJECTS), shop=shop)
            text = self.paragraph(SHOP_LINES, 2, 4, shop=shop)
            body = (f"Dear {to_name},\n\n{self.wrap(text)}\n\nKind regards,\nYour {shop} team\n"
                    f"https://www.{shop_domain}/account\n")
            html_text = (f"<html><body><p>Dear {to_name},</p><p>{text}</p><p>Kind regards,<br>Your {shop} team</p>"
                         f"<p><a href=\"https://www.{shop_domain}/account\">Your account</a></p></body></html>")
        elif kind == "promo":
            shop, shop_domain = self.pick(SHOPS)
            domain, sender_name, local = shop_domain, shop, "offers"
            subject = self.fill(self.pick(PROMO_SUBJECTS), shop=shop)
            text = self.paragraph(PROMO_LINES, 2, 4, shop=shop)
            body = (f"{self.wrap(text)}\n\nShop now: https://www.{shop_domain}/sale\n"
                    f"Unsubscribe: https://www.{shop_domain}/unsubscribe\n")
            html_text = (f"<html><body><h1>{subject}</h1><p>{text}</p><p><a href=\"https://www.{shop_domain}/sale\">"
                         f"Shop now</a></p><p><small><a href=\"https://www.{shop_domain}/unsubscribe\">Unsubscribe</a>"
                         f"</small></p></body></html>")
        else:
            shop, shop_domain = self.pick(SHOPS)
            domain, sender_name, local = shop_domain, f"{shop} News", "news"
            subject = self.fill(self.pick(NEWS_SUBJECTS), shop=shop)
            text = self.paragraph(NEWS_LINES, 2, 4)
            body = f"{self.wrap(text)}\n\nTo unsubscribe, visit https://www.{shop_domain}/newsletter\n"
            html_text = (f"<html><body><h2>{subject}</h2><p>{text}</p><p><small><a href=\"https://www.{shop_domain}"
                         f"/newsletter\">Unsubscribe</a></small></p></body></html>")
        headers = [
            ("Received", f"from mx.{domain} (mx.{domain} [192.0.2.{self.r.randint(1, 254)}]) by mail.example.net"),
            ("Date", self.date_header()), ("From", f"{sender_name} <{local}@{domain}>"), ("To", to),
            ("Subject", subject), ("Message-ID", self.message_id(domain)),
        ] + headers
        style = self.style() if kind != "list" else "8bit"
        return self.build(headers, body, html_text, style, self.pick(HAM_MAILERS), attachment)

    # -- spam ---------------------------------------------------------------------------------------

    def spam(self) -> bytes:
        kind = self.pick(sorted(SPAM))
        subjects, lines = SPAM[kind]
        domain = self.pick(SPAM_DOMAINS)
        sender_name, local = self.person()
        if self.r.random() < 0.5:
            local = "".join(self.r.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(self.r.randint(6, 12)))
        _, to_local = self.person()
        subject = self.fill(self.pick(subjects))
        if self.r.random() < 0.2:
            subject = subject.upper()
        text = self.paragraph(lines, 3, 5)
        closer = self.fill(self.pick(SPAM_CLOSERS))
        footer = self.pick(SPAM_FOOTERS)
        greeting = self.r.choice(
            ["Dear Friend,", "Dear valued customer,", "Hello,", f"Hi {to_local.split('.')[0].title()},", ""]
        )
        body = f"{greeting}\n\n{self.wrap(text)}\n\n{closer}\n\n{footer}\n"
        url = closer.split()[-1].rstrip("!")
        html_text = None
        if self.r.random() < 0.55:
            html_text = (f"<html><body><p>{greeting}</p><p><b>{text}</b></p><p><a href=\"{url}\">"
                         f"<font size=\"5\" color=\"red\">CLICK HERE</font></a></p>"
                         f"<p><font size=\"1\">{footer}</font></p>"
                         f"</body></html>")
        style = "html-only" if html_text and self.r.random() < 0.4 else self.style()
        headers = [
            ("Received", f"from unknown (HELO {self.pick(['localhost', 'user-pc', domain])}) "
                         f"([198.51.100.{self.r.randint(1, 254)}]) by mail.example.net"),
            ("Date", self.date_header()), ("From", f"\"{sender_name}\" <{local}@{domain}>"),
            ("To", f"{to_local}@{self.pick(HAM_DOMAINS)}"), ("Subject", subject),
            ("Message-ID", self.message_id(domain)),
        ]
        if self.r.random() < 0.5:
            role = self.pick(["claims", "support", "info", "agent"])
            headers.append(("Reply-To", f"{role}@{self.pick(SPAM_DOMAINS)}"))
        return self.build(headers, body, html_text, style, self.pick(SPAM_MAILERS))


def mbox(messages: list[bytes]) -> bytes:
    """mboxrd: a From_ line before each message, '>' added to lines that start with '>*From '."""
    out = []
    for data in messages:
        out.append(b"From corpus@example.invalid Mon Jan  1 00:00:00 2024\n")
        for line in data.splitlines(keepends=True):
            if line.lstrip(b">").startswith(b"From "):
                line = b">" + line
            out.append(line)
        out.append(b"\n")
    return b"".join(out)


def corpus() -> dict[str, bytes]:
    """Relative path -> contents of every file this script writes."""
    files = {}
    for part, size in SIZES.items():
        maker = Maker(SEEDS[part])
        ham = [maker.ham() for _ in range(size)]
        spam = [maker.spam() for _ in range(size)]
        files[f"{part}/ham.mbox"] = mbox(ham)
        files[f"{part}/spam.mbox"] = mbox(spam)
    return files


def main() -> int:
    for name, data in corpus().items():
        path = HERE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"{path.relative_to(HERE)}: {data.count(b'From corpus@')} messages, {len(data)} octets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
