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
"""

from __future__ import annotations

import base64
import quopri
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {"train": 110, "test": 60}
SEEDS = {"train": 1709, "test": 4242}

FIRST = ["Anna", "Ben", "Carla", "David", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira",
         "Lars", "Maya", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tara", "Ulla", "Viktor",
         "Wen", "Yusuf", "Zoe", "Marta", "Pietro", "Sofia", "Tomas", "Lea"]
LAST = ["Berg", "Costa", "Dahl", "Eriksen", "Fischer", "Garcia", "Hansen", "Ito", "Jensen", "Kowalski",
        "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Rossi", "Schmidt", "Tanaka", "Ueda", "Weber"]
HAM_DOMAINS = ["example.com", "example.org", "uni-example.edu", "acme-corp.example", "kite-labs.example",
               "northwind.example", "mail.example.net", "familie.example.de"]
SPAM_DOMAINS = ["best-deal-4u.example", "pharma-direct.example", "secure-verify-login.example",
                "lotto-intl-claims.example", "quick-cash-now.example", "crypto-gainz.example",
                "hot-singles-near.example", "rank-your-site.example", "parcel-track-fee.example",
                "slim-fast-keto.example", "luxury-replica.example", "mailer-bulk.example"]
HAM_MAILERS = ["Mozilla Thunderbird 115.6.0", "Microsoft Outlook 16.0", "Apple Mail (2.3731)",
               "Mutt/2.2.9 (2023-08-31)", "Evolution 3.46.4", "Roundcube Webmail/1.6.5", None, None]
SPAM_MAILERS = ["PHPMailer 5.2.1 (https://github.com/PHPMailer/PHPMailer)", "Bulk Mailer Pro 7.1",
                "MailKing 4.0", "Microsoft Outlook Express 6.00.2600.0000", None, None, None]

# -- ham --------------------------------------------------------------------------------------------

PROJECTS = ["billing migration", "Q3 roadmap", "search indexer", "onboarding guide", "data pipeline",
            "customer survey", "release 4.2", "office move", "security audit", "mobile app redesign",
            "warehouse inventory", "grant proposal", "conference talk", "hiring plan", "API deprecation"]
WORK_SUBJECTS = ["Re: {project} status", "{project}: notes from today's meeting", "Agenda for {day}",
                 "Quick question about the {project}", "Review request: {project}",
                 "Fwd: {project} timeline", "Minutes: {project} sync", "Re: Re: {project} budget"]
WORK_LINES = [
    "I went through the draft of the {project} and left comments in the shared document.",
    "Could we move our meeting on {day} to {time}? I have a dentist appointment in the morning.",
    "The test suite is green again after the fix to the date parsing.",
    "Attached are the figures for the last quarter; the numbers for March still look low to me.",
    "Let's keep the scope small for now and revisit the reporting part in the next iteration.",
    "Please have a look at the pull request before Thursday, especially the migration script.",
    "The customer asked whether we can deliver the second milestone two weeks earlier.",
    "I booked the large conference room for {day} at {time}, with the projector.",
    "Thanks for covering the on-call shift last weekend, I owe you one.",
    "The vendor sent a revised quote; it is about eight percent lower than the first one.",
    "We still need a decision on the database schema before the team can continue.",
    "I summarised the open questions at the bottom of the wiki page.",
    "Marketing wants a short demo for the all-hands, maybe ten minutes.",
    "Our account manager at the hosting company will call you on {day}.",
    "The offer from the contractor includes training, which we did not ask for.",
    "Can you send me the slides from the workshop? I would like to reuse two diagrams.",
    "The deadline for the expense reports is the end of the month.",
    "I think the payment module needs more logging before we roll it out.",
]
LISTS = [("python-dev", "Python core development"), ("pgsql-general", "PostgreSQL general discussion"),
         ("debian-user", "Debian users"), ("rust-users", "Rust users forum digest"),
         ("linux-kernel", "Linux kernel mailing list"), ("birdwatchers", "Regional birdwatchers club")]
LIST_TOPICS = ["slow queries after upgrade", "PEP draft on pattern matching", "kernel panic on resume",
               "borrow checker and closures", "package pinning in stable", "vacuum settings for large tables",
               "spring migration count", "wheel build failures on ARM", "memory leak in the allocator",
               "systemd timer not firing", "owl sightings near the river", "async iterator semantics"]
LIST_LINES = [
    "I can reproduce this on a fresh install with the default configuration.",
    "Have you tried running it with verbose logging enabled? The trace should show which step hangs.",
    "The documentation for this option is unclear, I opened an issue to improve it.",
    "This changed in the last release; the old behaviour is available behind a flag.",
    "Here is the minimal example that triggers the problem, about twenty lines.",
    "We saw the same thing in production and rolled back to the previous version.",
    "A patch is attached; it passes the regression tests on my machine.",
    "The benchmark numbers improved by roughly fifteen percent with the new index.",
    "Please keep the discussion on the list so others can benefit from the answer.",
    "I counted forty-two geese and a pair of herons at the north lake on Sunday.",
    "The upstream maintainer confirmed the bug and a fix is in the queue.",
    "Could you share the output of the version command and your configuration file?",
]
PERSONAL_SUBJECTS = ["Dinner on {day}?", "Photos from the weekend", "Re: birthday plans", "Hi from {city}",
                     "Kids' school trip", "Are you free on {day}?", "Recipe you asked for", "Re: the garden"]
PERSONAL_LINES = [
    "It was so good to see you last weekend, the kids are still talking about the lake.",
    "Mum says hello and asks whether you are coming for her birthday.",
    "I uploaded the pictures to the family album, the one with the dog is my favourite.",
    "We could meet at the little Italian place near the station, around {time}?",
    "The tomatoes finally turned red, we will have more than we can eat.",
    "Don't forget to bring the board game, Tom wants his revenge.",
    "Here is the recipe: two cups of flour, a pinch of salt, and patience.",
    "The train was late again, but the view over {city} made up for it.",
    "Can you water the plants while we are away? The key is under the blue pot.",
    "Grandpa is doing much better after the operation, thank you for asking.",
]
CITIES = ["Lisbon", "Oslo", "Krakow", "Lyon", "Bologna", "Ghent", "Tartu", "Porto", "Graz", "Aarhus"]
SHOPS = [("Bookworm Books", "bookworm.example"), ("Nordic Outdoor", "nordic-outdoor.example"),
         ("City Energy", "cityenergy.example"), ("Rail Travel", "railtravel.example"),
         ("Harbour Bank", "harbourbank.example"), ("Green Grocer Online", "greengrocer.example")]
SHOP_SUBJECTS = ["Your order {order} has shipped", "Receipt for your payment to {shop}",
                 "Your {shop} statement for {month} is ready", "Booking confirmation {order}",
                 "Order {order}: delivery on {day}"]
SHOP_LINES = [
    "Thank you for your order. Your parcel is on its way and should arrive on {day}.",
    "Your monthly statement is now available in your online account.",
    "Amount paid: {amount} EUR by direct debit on {date}.",
    "You can track the delivery with the reference {order} on our website.",
    "Your seat reservation: coach 7, seat {seat}. Departure {time} from platform 3.",
    "If you have questions about this invoice, reply to this email or call our service team.",
    "Items: 1 x hiking boots (size 42), 1 x wool socks.",
    "This receipt was sent to you because you made a purchase at {shop}.",
]
PROMO_SUBJECTS = ["Summer sale: up to 30% off at {shop}", "Members save 15% this weekend",
                  "Free shipping on your next order", "New arrivals you might like", "Last chance: sale ends {day}"]
PROMO_LINES = [
    "Our summer sale starts today: save up to 30 percent on selected items, online and in store.",
    "As a member you get free shipping on every order until the end of {month}.",
    "Click here to see the new arrivals picked for you based on your last order.",
    "Use the code SUMMER15 at checkout; the offer is valid until {date}.",
    "Limited stock on some items, order soon to avoid disappointment.",
    "You are receiving this email because you subscribed to offers from {shop}.",
]
NEWS_SUBJECTS = ["{shop} newsletter: {month} events", "This month at the city library",
                 "Members' update from the cycling club", "Spring programme of the community choir"]
NEWS_LINES = [
    "Our reading group meets on the first Tuesday of the month in the upstairs room.",
    "The annual general meeting will take place on {date}; the agenda is attached.",
    "New in the catalogue: forty titles on local history and a shelf of graphic novels.",
    "Volunteers are welcome for the repair cafe, no experience needed.",
    "Membership fees for next year stay the same.",
    "The summer sale starts on {date}; members get early access for one day.",
]

# -- spam ---------------------------------------------------------------------------------------

SPAM = {
    "pharma": (
        ["Cheap m3ds without prescription", "V1AGRA and C1ALIS at 80% off", "Your pharmacy order discount",
         "Best prices for meds online", "Order now - discreet shipping worldwide"],
        ["Buy generic pills online without a prescription, discreet packaging guaranteed.",
         "Viagra, Cialis, Levitra from only {price} per dose. No doctor visit required!",
         "Our licensed online pharmacy ships worldwide within 24 hours.",
         "Men's health breakthrough: satisfaction guaranteed or your money back.",
         "Over 1 million satisfied customers trust our certified pharmacists.",
         "Special bonus: 4 free pills with every order above {price}."]),
    "loan": (
        ["Pre-approved loan of ${big}", "Consolidate your debt TODAY", "Lowest mortgage rates guaranteed",
         "Bad credit? No problem!", "Get cash in 1 hour"],
        ["You have been pre-approved for a personal loan of up to ${big}, no credit check.",
         "Refinance now and lower your monthly payments by up to 60 percent.",
         "Bad credit, no credit, bankruptcy: everyone is approved!",
         "Funds are deposited directly into your bank account within one hour.",
         "This exclusive rate expires in 48 hours, act now before it is too late.",
         "Fill out the simple form and a loan officer will contact you immediately."]),
    "fraud": (
        ["URGENT BUSINESS PROPOSAL", "Confidential: inheritance of ${big}", "Congratulations, you WON!",
         "Claim your lottery prize now", "Dear beneficiary, fund release notification"],
        ["I am barrister {name}, personal attorney to a late client who died in a car accident.",
         "He left a deposit of ${big} million with no next of kin, and I seek your cooperation.",
         "Your email address won the international lottery draw held on {date}.",
         "To release the funds we require your full name, bank account details and a processing fee.",
         "This transaction is 100% risk free and must remain strictly confidential.",
         "You will receive 40 percent of the total sum for your assistance."]),
    "phish": (
        ["Your account has been suspended", "Action required: verify your identity",
         "Unusual sign-in activity detected", "Your mailbox is full - upgrade now",
         "Payment failed: update your billing information"],
        ["We detected unusual activity and temporarily suspended your account.",
         "To restore access, verify your identity within 24 hours using the secure link below.",
         "Failure to confirm your details will result in permanent account closure.",
         "Click here to login and update your password and billing information.",
         "Dear valued customer, our security system requires you to re-validate your account.",
         "Your mailbox storage quota has been exceeded, incoming messages are being rejected."]),
    "crypto": (
        ["Turn ${small} into ${big} with Bitcoin", "The crypto secret banks don't want you to know",
         "Earn passive income with our AI trading bot", "Last chance: presale token 1000x",
         "Celebrity reveals crypto fortune"],
        ["Our automated trading robot made investors an average of {pct}% profit per week.",
         "Start with just ${small} and withdraw your profits any time, guaranteed returns.",
         "Thousands of ordinary people are becoming millionaires with this bitcoin system.",
         "Only 50 spots left in the exclusive investor program, register now.",
         "Deposit today and receive a 200% bonus on your first investment.",
         "No experience needed, the algorithm does everything for you."]),
    "dating": (
        ["{girl} wants to meet you tonight", "Lonely? Hot singles in your area", "You have 3 new private messages",
         "She viewed your profile", "Find your soulmate today - free signup"],
        ["Hi handsome, I saw your profile and I think we would have a lot of fun together.",
         "Thousands of attractive singles are waiting to chat with you right now.",
         "Sign up free and see who is online near you, no credit card required.",
         "I am new in town and looking for someone to show me around, write me back.",
         "Click to see my private photos, but hurry, they are only available today.",
         "100% discreet, meet real people in your area tonight."]),
    "seo": (
        ["Get your website to page #1 on Google", "Increase your traffic by 500%", "Proposal for {domain}",
         "Website redesign offer", "SEO services - guaranteed ranking"],
        ["I was checking your website and noticed it is not ranking on the first page of search results.",
         "Our SEO experts guarantee first page rankings within 30 days or your money back.",
         "We offer affordable web design, backlinks, social media marketing and app development.",
         "Reply with your phone number and our marketing consultant will call you with a free audit.",
         "Over 2500 businesses increased their sales with our proven strategy.",
         "If you are not interested, reply REMOVE and we will not contact you again."]),
    "parcel": (
        ["Your package is on hold", "Delivery failed: customs fee required", "Parcel {order} awaiting payment",
         "Final notice: unclaimed shipment", "Reschedule your delivery"],
        ["Your parcel could not be delivered because a customs fee of {price} is unpaid.",
         "Please pay the fee within 48 hours or the shipment will be returned to the sender.",
         "Confirm your address and pay securely with your credit card using the link below.",
         "Tracking number {order}: status ON HOLD.",
         "Our courier attempted delivery but nobody was at home.",
         "Enter your card number, expiry date and security code to release the package."]),
    "diet": (
        ["Lose 30 pounds in 30 days", "Doctors hate this weight loss trick", "Keto pills: melt fat fast",
         "Celebrity diet secret revealed", "Burn belly fat while you sleep"],
        ["This miracle supplement melts belly fat without diet or exercise.",
         "Clinically proven formula, 100% natural ingredients, no side effects.",
         "Order your free trial bottle today, just pay shipping.",
         "Customers lost up to {pct} pounds in the first month!",
         "Limited stock available, this offer expires at midnight.",
         "Hollywood stars use this secret to stay slim, now available to you."]),
    "bec": (
        ["Are you available?", "Quick favour", "Invoice {order} overdue", "Re: payment request",
         "Urgent wire transfer today", "Document shared with you"],
        ["Are you at your desk? I need you to handle a confidential task for me today.",
         "Please purchase six gift cards of $100 each for a client and send me the codes.",
         "The attached invoice is overdue, kindly process the payment to the new bank account below.",
         "I am in a meeting and cannot talk on the phone, reply by email only.",
         "A document has been shared with you, sign in with your email password to view it.",
         "Our bank details have changed, please update them before the next transfer."]),
    "replica": (
        ["Luxury watches at 90% off", "Rolex replicas - perfect quality", "Designer handbags cheap",
         "Swiss watches from ${small}", "Top quality replica sale"],
        ["Perfect replicas of Rolex, Omega, Breitling and more, indistinguishable from the original.",
         "Designer handbags and watches at a fraction of the retail price.",
         "Free worldwide shipping on all orders over ${small}.",
         "Impress your friends and colleagues with a luxury watch for less.",
         "Huge discounts this week only, secure payment and fast delivery.",
         "Over 5000 models in stock, visit our online store now."]),
}
SPAM_CLOSERS = ["Click here: {url}", "Visit {url} now!", "Order now at {url}", "Claim it here: {url}",
                "Secure link: {url}", "Don't miss out -> {url}"]
SPAM_FOOTERS = ["To unsubscribe from this list click here.", "You received this because you opted in.",
                "This is not spam. Reply STOP to be removed.", "", ""]
GIRLS = ["Jessica", "Natalie", "Svetlana", "Kristina", "Amber", "Lena"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


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
