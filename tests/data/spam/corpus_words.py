"""The words of the spam classifier's test corpus (used by make_corpus.py beside this file): names,
domains and mailers, and for each kind of ham and spam its subjects and phrases. Changing anything here
changes the corpus: run make_corpus.py and commit the files it writes.
"""

from __future__ import annotations

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
