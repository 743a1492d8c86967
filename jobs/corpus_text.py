"""Hand-written documents for the sample corpus (and the seeds of the benchmark corpus).

Three kinds, sixteen each: software package descriptions, customer support tickets and
scientific paper abstracts. Every entry carries, besides ``title`` and ``text``, the facts a
reader would extract from it (``name``/``language``/``license``/``software_kind`` for packages,
``category``/``urgency``/``customer`` for tickets, ``field`` and a few topic words for
abstracts). Those facts are not written to the corpus; they let the benchmark script compose
longer documents that stay consistent with the original, and they are a reference answer for
eyeballing job output.

All names of packages, companies and people are invented.
"""

from __future__ import annotations

PACKAGES: list[dict] = [
    dict(
        name="quiver-csv", language="Python", license="MIT", software_kind="library",
        title="quiver-csv 2.3.1",
        text=(
            "quiver-csv is a small, dependency-free Python library for reading and writing CSV "
            "files that do not follow the rules. It sniffs delimiters, quote characters and "
            "encodings (including UTF-16 with or without a byte-order mark), recovers from ragged "
            "rows instead of raising, and reports every repair it made so that you can audit the "
            "result afterwards. Reading is streaming, so multi-gigabyte exports from legacy ERP "
            "systems are processed in constant memory. The API mirrors the standard library's csv "
            "module closely enough that most code only needs a changed import. Requires Python 3.9 "
            "or later. Released under the MIT License."
        ),
    ),
    dict(
        name="logrotor", language="C", license="GPL-2.0-or-later", software_kind="tool",
        title="logrotor - rotate, compress and ship log files",
        text=(
            "logrotor rotates, compresses and optionally uploads log files according to rules "
            "placed in /etc/logrotor.d. Unlike logrotate it runs as a small daemon and watches "
            "files with inotify, so a file is rotated when it crosses its size limit rather than "
            "at the next cron run. Compression with gzip, zstd or xz happens in a background "
            "thread and never blocks the writer.\n\n"
            "This package contains the daemon, the logrotorctl command-line client and a systemd "
            "unit. logrotor is written in C and has no runtime dependencies beyond libc and zlib. "
            "It is distributed under the GNU General Public License, version 2 or (at your option) "
            "any later version."
        ),
    ),
    dict(
        name="ringlog", language="Rust", license="MIT OR Apache-2.0", software_kind="library",
        title="ringlog",
        text=(
            "A bounded, lock-free ring buffer for structured log records, for Rust programs that "
            "cannot afford to block on logging. Producers on any number of threads push records "
            "with a single atomic operation; one consumer drains them in batches and hands them to "
            "a sink (stderr, a file, or your own implementation of the Sink trait). When the "
            "buffer is full, ringlog drops the oldest records and counts them, so a burst of "
            "errors never stalls a request path. Works with the log and tracing facades, and in "
            "no_std environments with the alloc feature. Minimum supported Rust version is 1.70. "
            "Licensed under either of MIT or Apache-2.0 at your option."
        ),
    ),
    dict(
        name="pgdiffer", language="Go", license="BSD-3-Clause", software_kind="tool",
        title="pgdiffer: schema diffs for PostgreSQL",
        text=(
            "pgdiffer connects to two PostgreSQL databases, compares their schemas and prints the "
            "SQL needed to turn one into the other: tables, columns, indexes, constraints, views, "
            "functions, triggers and grants. It orders the statements so that dependencies are "
            "respected and wraps them in a transaction where PostgreSQL allows it. Destructive "
            "changes such as dropped columns are commented out unless you pass --allow-drop.\n\n"
            "pgdiffer is a single static binary written in Go; download it from the releases page "
            "or run it from the official container image. Tested against PostgreSQL 12 to 17. "
            "BSD 3-Clause license."
        ),
    ),
    dict(
        name="datefmt-lite", language="TypeScript", license="ISC", software_kind="library",
        title="datefmt-lite",
        text=(
            "Format and parse dates in the browser without shipping seventy kilobytes of locale "
            "data. datefmt-lite is a tree-shakeable TypeScript library that delegates "
            "localisation to the built-in Intl API and adds what Intl is missing: parsing of "
            "user-typed dates, relative phrases such as \"3 days ago\", and ISO week numbers. "
            "The core is 2.1 kB minified and gzipped. Ships ES modules and type declarations; "
            "works in Node 18+, Deno and all evergreen browsers. ISC licensed."
        ),
    ),
    dict(
        name="Marginalia", language="C++", license="GPL-3.0", software_kind="application",
        title="Marginalia - an e-book reader for people who write in the margins",
        text=(
            "Marginalia is a desktop reader for EPUB and PDF files built around annotation. "
            "Highlights, notes and bookmarks are stored in a plain SQLite file next to your "
            "library, can be searched across every book at once, and export to Markdown or "
            "BibTeX with page numbers intact. The reader supports two-page spreads, a distraction-"
            "free mode, adjustable fonts for reflowable books, and dark themes that also invert "
            "scanned PDFs sensibly.\n\n"
            "Marginalia is written in C++ with Qt 6 and runs on Linux, Windows and macOS. It "
            "collects no telemetry. The source code is available under the GNU GPL version 3; "
            "prebuilt packages are provided for Flatpak and Homebrew."
        ),
    ),
    dict(
        name="tidyspectra", language="R", license=None, software_kind="library",
        title="tidyspectra: Tidy Tools for Spectroscopy Data",
        text=(
            "Tools for importing, cleaning and plotting spectroscopy data (UV-Vis, FTIR, Raman and "
            "fluorescence) as tidy data frames. Readers are provided for the export formats of "
            "the most common instrument vendors, including JCAMP-DX and SPC. The package offers "
            "baseline correction by asymmetric least squares, Savitzky-Golay smoothing, peak "
            "picking with uncertainty estimates, and ggplot2 geoms that draw stacked and offset "
            "spectra. Designed for teaching laboratories as much as for research groups, with "
            "vignettes that walk through a complete analysis."
        ),
    ),
    dict(
        name="fonts-kestrel", language=None, license="OFL-1.1", software_kind="other",
        title="fonts-kestrel - monospaced programming font with optional ligatures",
        text=(
            "Kestrel is a monospaced typeface designed for source code and terminals. It has a "
            "tall x-height, clearly distinguished 0/O and 1/l/I, and optional programming "
            "ligatures for arrows and comparison operators that can be switched off with a "
            "stylistic set. Eight weights from Thin to Black are included, each with a true "
            "italic, and coverage extends to Latin, Greek, Cyrillic and box-drawing characters.\n\n"
            "This package contains the TrueType and OpenType versions of the font. Kestrel is "
            "licensed under the SIL Open Font License, version 1.1."
        ),
    ),
    dict(
        name="jsonpatch-j", language="Java", license="Apache-2.0", software_kind="library",
        title="jsonpatch-j",
        text=(
            "jsonpatch-j implements JSON Patch (RFC 6902) and JSON Merge Patch (RFC 7386) for "
            "Java 11 and later. It can compute a minimal patch between two documents, apply a "
            "patch atomically (either every operation succeeds or the input is left untouched), "
            "and validate patches before they reach your service. Adapters are included for "
            "Jackson and Gson trees, so no conversion is needed in existing code. The library has "
            "been used in production for REST APIs that accept PATCH requests from mobile "
            "clients. Available on Maven Central under the Apache License, Version 2.0."
        ),
    ),
    dict(
        name="rack-quota", language="Ruby", license="MIT", software_kind="library",
        title="rack-quota",
        text=(
            "Rack middleware that enforces per-client request quotas. Clients are identified by "
            "API key, user id or IP address, and limits can be set per route with a sliding "
            "window or a token bucket. Counters are kept in Redis, or in memory for tests and "
            "single-process servers. When a client is over its limit it receives a 429 response "
            "with Retry-After and RateLimit headers, and an ActiveSupport notification is emitted "
            "so that you can log or alert on it. Works with Rails, Sinatra, Hanami and any other "
            "Rack application. MIT license."
        ),
    ),
    dict(
        name="tidytex", language="Haskell", license="BSD-3-Clause", software_kind="tool",
        title="tidytex: a formatter for LaTeX sources",
        text=(
            "tidytex reformats LaTeX source files in a consistent, diff-friendly style: one "
            "sentence per line, aligned tabular environments, normalised spacing around math "
            "delimiters and environments indented by their nesting depth. It never changes the "
            "typeset output, and it leaves verbatim, listings and minted blocks exactly as they "
            "are. The formatter can be run from the command line, as a pre-commit hook, or from "
            "editors through its language-server mode. Written in Haskell; binaries for Linux, "
            "macOS and Windows are attached to each release. BSD-3-Clause."
        ),
    ),
    dict(
        name="science-geography", language=None, license=None, software_kind="other",
        title="science-geography - Debian Science geography packages",
        text=(
            "This metapackage is part of the Debian Pure Blend \"Debian Science\" and installs "
            "packages that are useful for geographers: geographic information systems, tools to "
            "convert between map projections, libraries for reading raster and vector formats, "
            "and programs to process GPS tracks. It does not contain any software itself; it only "
            "depends on the packages selected by the Debian Science team. Installing it is a quick "
            "way to set up a workstation for a course or a field campaign, and removing it does "
            "not remove the packages it pulled in."
        ),
    ),
    dict(
        name="ex_backoff", language="Elixir", license="Apache-2.0", software_kind="library",
        title="ex_backoff",
        text=(
            "Exponential backoff and retry for Elixir. Wrap any function in ExBackoff.retry/2 and "
            "it is retried on the errors you choose, with full or decorrelated jitter, a maximum "
            "number of attempts and an overall deadline. Delays are computed by pure functions, "
            "which makes the retry schedule easy to test without sleeping. Telemetry events are "
            "emitted for every attempt. Licensed under Apache 2.0."
        ),
    ),
    dict(
        name="Tallyho", language="Python", license="AGPL-3.0", software_kind="application",
        title="Tallyho - self-hosted household budgeting",
        text=(
            "Tallyho is a self-hosted web application for tracking household income and expenses. "
            "Import statements from your bank as CSV, OFX or CAMT files, let Tallyho suggest "
            "categories based on your earlier choices, and see where the money went each month. "
            "Several people can share one budget, each with their own login, and recurring bills "
            "are detected automatically so that upcoming payments show up on a calendar.\n\n"
            "Tallyho is a Django application with a small amount of htmx on the front end. It runs "
            "with SQLite or PostgreSQL, and a docker-compose file is provided. Your data stays on "
            "your server. Tallyho is free software under the GNU Affero General Public License v3."
        ),
    ),
    dict(
        name="dotsync", language="Shell", license="Unlicense", software_kind="tool",
        title="dotsync",
        text=(
            "dotsync keeps your dotfiles in sync across machines using a plain git repository. "
            "It is a single POSIX shell script: copy it to your PATH and run dotsync init. Files "
            "are symlinked into place, per-host overrides live in directories named after the "
            "hostname, and secrets can be kept out of the repository with an ignore list. "
            "dotsync status shows which files differ from the repository. Released into the "
            "public domain under the Unlicense."
        ),
    ),
    dict(
        name="fixedpoint.hpp", language="C++", license="BSL-1.0", software_kind="library",
        title="fixedpoint.hpp",
        text=(
            "A header-only C++17 library of fixed-point number types for microcontrollers and "
            "deterministic simulations. fixed<16, 16> behaves like a built-in arithmetic type, "
            "with overloaded operators, constexpr conversions and std::numeric_limits "
            "specialisations, but every operation is performed on integers and produces "
            "bit-identical results on every platform. Overflow behaviour is selectable per type "
            "(wrap, saturate or trap), and sqrt, sin, cos and atan2 are provided as table-free "
            "CORDIC implementations. Drop the single header into your project; there is nothing "
            "to build. Distributed under the Boost Software License 1.0."
        ),
    ),
]


TICKETS: list[dict] = [
    dict(
        category="billing", urgency="high", customer="Dana Whitfield",
        title="Charged twice for March subscription",
        text=(
            "Hello,\n\nI was charged twice for my Team plan this month: two payments of $49.00 on "
            "March 3, both from the same Visa card ending in 4417. I only have one workspace and "
            "one subscription, so I assume this is a mistake on your side. Could you refund the "
            "second charge? I have attached screenshots of both transactions from my bank app.\n\n"
            "This is a company card and our finance team reconciles it weekly, so I would "
            "appreciate a quick answer.\n\nThanks,\nDana Whitfield"
        ),
    ),
    dict(
        category="account_access", urgency="high", customer="Tomasz Grabowski",
        title="Lost my phone - can't get past two-factor login",
        text=(
            "Hi, my phone was stolen on Saturday and with it the authenticator app I used for "
            "two-factor authentication. I have a new phone with the same number, but the login "
            "page only asks for the 6-digit code and I don't have my backup codes (I never "
            "printed them, I know...). I can confirm my identity however you need: the last four "
            "digits of the card on file, my billing address, the date I signed up. All my "
            "project files are in this account and I have a client deadline on Thursday. Please "
            "tell me what to do.\n\nTomasz"
        ),
    ),
    dict(
        category="bug_report", urgency="normal", customer="Aiko Matsuda",
        title="CSV export cuts off rows with accented characters",
        text=(
            "When I export the contacts list to CSV, every row whose name contains an accented "
            "character (e.g. \"Renée\" or \"Müller\") is cut off after that character, and the "
            "remaining columns end up in the next line. The same list exports correctly to Excel "
            "format. I tried in Chrome and Firefox on Windows 11 with the same result. Steps: "
            "Contacts > select all > Export > CSV (UTF-8). The file is about 2,300 rows. It "
            "worked fine until about two weeks ago, so I think something changed in a recent "
            "update. Could you take a look? We import this file into our newsletter tool every "
            "Monday."
        ),
    ),
    dict(
        category="feature_request", urgency="low", customer="Priya Raman",
        title="Feature request: single sign-on with Okta",
        text=(
            "Hi team,\n\nWe have been on the Business plan for about a year and we are very happy "
            "with the product. Our IT department is now moving every tool we use behind Okta, and "
            "they asked me whether you support SAML or OIDC single sign-on. I could not find "
            "anything in the docs. Is this on your roadmap, and if so, roughly when? Automatic "
            "deprovisioning through SCIM would also be a big plus for us, since people leave and "
            "join every month. If SSO is only available on the Enterprise plan, could you send "
            "me the pricing for 85 seats?\n\nBest regards,\nPriya Raman\nOperations Manager"
        ),
    ),
    dict(
        category="billing", urgency="normal", customer="Laurent Baptiste",
        title="Invoice needs our VAT number and new address",
        text=(
            "Bonjour,\n\nOur accounting department cannot book your invoices INV-20931 and "
            "INV-21377 because they do not show our intra-community VAT number, and the address "
            "is still our old office in Lyon. We moved to 14 rue des Tanneurs, 69002 Lyon in "
            "January. Could you please reissue both invoices with the VAT number FR 42 812 345 678 "
            "and the new address, and make sure future invoices use them as well? I changed the "
            "address in the billing settings but the VAT field is greyed out.\n\nMerci,\n"
            "Laurent Baptiste"
        ),
    ),
    dict(
        category="bug_report", urgency="high", customer="Kwame Mensah",
        title="Android app crashes when uploading a photo",
        text=(
            "The Android app closes immediately every time I try to attach a photo to a job "
            "report. It happens with photos from the camera and from the gallery. Phone is a "
            "Pixel 7 on Android 14, app version 5.12.0 from the Play Store. I already cleared "
            "the cache, reinstalled the app and restarted the phone. Uploading from the website "
            "on my laptop works. My whole field crew uses the app to document finished work, so "
            "right now we are writing notes on paper and typing them in at night. Please fix "
            "this as soon as you can."
        ),
    ),
    dict(
        category="cancellation", urgency="normal", customer="Helen Okafor",
        title="Cancel annual plan and refund remaining months",
        text=(
            "Hello, I would like to cancel my annual subscription. I renewed in November but our "
            "small charity has since lost the grant that paid for it, and we have moved our "
            "volunteers to a free tool. We have not used the account since the end of January. "
            "Is it possible to get a refund for the remaining months? I understand if you cannot "
            "refund the whole amount, but anything would help us. Please also confirm that our "
            "data will be deleted after cancellation. Kind regards, Helen Okafor, Treasurer"
        ),
    ),
    dict(
        category="account_access", urgency="normal", customer="Marcus Lindqvist",
        title="Password reset email never arrives",
        text=(
            "I've tried to reset my password five times since yesterday and the email never "
            "arrives. It's not in spam, not in promotions, nowhere. Other emails from you (the "
            "weekly digest) do reach me at the same address, marcus.lindqvist@fjordline-design.se. "
            "Now the account says it is locked because of too many attempts. Can you unlock it "
            "and send the reset link manually, or tell me if something is wrong with my address "
            "on your side?"
        ),
    ),
    dict(
        category="outage", urgency="urgent", customer="Sofia Castillo",
        title="URGENT: API returning 502 for all requests",
        text=(
            "Since 09:40 UTC every call to the orders API returns 502 Bad Gateway. Our checkout "
            "depends on it, so customers cannot place orders at the moment. Your status page "
            "says all systems operational.\n\n"
            "What we checked so far:\n"
            "- We have not deployed anything on our side since Friday.\n"
            "- The same requests fail from our EU and US servers and from a laptop with curl, so "
            "it is not our network.\n"
            "- GET /v2/orders and POST /v2/orders both fail; GET /v2/products still works.\n"
            "- Rotating the API key makes no difference.\n\n"
            "Example request id from the response headers: 7f3c9a21-0d4e-4b8a-9e61-55a2c8f0b1de. "
            "The response body is the generic HTML error page of your load balancer, not your "
            "usual JSON error.\n\n"
            "We are on the Scale plan with a 99.9% SLA and a phone number for priority support, "
            "but nobody answers that number. Please escalate this immediately and give us an "
            "estimate for a fix; we are losing sales every minute and will have to switch off "
            "online ordering if it is not resolved within the hour.\n\n"
            "Sofia Castillo, Head of Engineering, Pampa Coffee Roasters"
        ),
    ),
    dict(
        category="feature_request", urgency="low", customer="Jonas Becker",
        title="Webhooks for invoice events?",
        text=(
            "Hi! We sync invoices from your platform into our ERP. Right now a script polls the "
            "invoices endpoint every five minutes, which is slow and keeps hitting your rate "
            "limit at the end of the month when we create a few thousand invoices at once. Would "
            "you consider adding webhooks for invoice.created, invoice.paid and invoice.voided? "
            "Signed payloads and retries with backoff would be ideal. Happy to test a beta "
            "version if that helps. Thanks, Jonas"
        ),
    ),
    dict(
        category="privacy", urgency="normal", customer="Eleanor Hughes",
        title="Request to delete my personal data (GDPR)",
        text=(
            "Dear Sir or Madam,\n\nUnder Article 17 of the General Data Protection Regulation I "
            "request the erasure of all personal data you hold about me, including my account, "
            "order history, support conversations and any data shared with third parties for "
            "marketing. My account email is e.hughes1987@postbox.co.uk. Please confirm in writing "
            "once the deletion has been completed, and tell me which data, if any, you are "
            "required to keep and for how long. I expect a response within one month as required "
            "by law.\n\nYours faithfully,\nEleanor Hughes"
        ),
    ),
    dict(
        category="billing", urgency="normal", customer="Rahul Mehta",
        title="Price increase - what happens to my plan?",
        text=(
            "Got your email about the new pricing from next month. I'm on the old Starter plan "
            "at $12/month and I'm not sure if it will go up to $19 or if I'm grandfathered. I "
            "only use the basic features, so if the price goes up I would rather downgrade to "
            "the free tier. Will I lose my existing projects if I downgrade? There are 14 of them "
            "and the free tier says 3 projects maximum. Thanks."
        ),
    ),
    dict(
        category="bug_report", urgency="normal", customer="Grace Liu",
        title="Calendar sync shows meetings an hour off since clocks changed",
        text=(
            "Since daylight saving time started on Sunday, all meetings that I create in your app "
            "show up one hour late in my Google Calendar. Meetings created in Google Calendar "
            "appear at the right time in your app, so it is only one direction. My time zone in "
            "the profile settings is America/Vancouver and my laptop is set to the same. Three "
            "colleagues see the same thing. As a workaround we have been entering meetings "
            "directly in Google, but clients booking through the public booking page still get "
            "the wrong time in their invitations, which caused two missed calls this week."
        ),
    ),
    dict(
        category="shipping", urgency="high", customer="Oluwaseun Adeyemi",
        title="Order #58213 arrived damaged",
        text=(
            "My order #58213 (one Aero 2 standing desk frame) arrived this morning with the box "
            "torn open and one of the leg columns bent, so the desk cannot be assembled. I took "
            "photos of the box and the part before unpacking anything else. I need a working desk "
            "by next week because I start a new remote job on Monday. Can you send a replacement "
            "leg column by express, or should I return the whole frame? Please don't make me wait "
            "for a pickup before you ship the replacement."
        ),
    ),
    dict(
        category="how_to", urgency="low", customer="Beatriz Souza",
        title="How do I give a contractor access to only one project?",
        text=(
            "We're hiring a freelance designer for two months. How do I give her access to one "
            "project only? Inviting her from the Members page gives her the whole workspace. "
            "Is there a guest role I'm missing? We're on the Pro plan. Thanks!"
        ),
    ),
    dict(
        category="feedback", urgency="low", customer="Ian McAllister",
        title="Love the new editor - one small thing",
        text=(
            "Just wanted to say the new editor is a huge improvement, much faster with our long "
            "documents and the table tools are great. One small thing: the keyboard shortcut for "
            "strikethrough changed from Ctrl+Shift+X to Ctrl+Shift+S, which clashes with \"save "
            "as\" in my browser. Could it be made configurable, or changed back? Not urgent at "
            "all. Keep up the good work. Ian"
        ),
    ),
]


ABSTRACTS: list[dict] = [
    dict(
        field="ecology", subject="pollinator visitation", data="field observations",
        title="Urban gardens sustain wild bee diversity across a rural-to-urban gradient",
        text=(
            "Urbanisation is widely assumed to erode pollinator communities, yet cities also "
            "contain flower-rich habitats that are absent from intensively farmed landscapes. We "
            "surveyed wild bees in 48 sites along a rural-to-urban gradient around Leipzig, "
            "Germany, using pan traps and standardised transect walks over two flowering "
            "seasons. In total we recorded 11,734 individuals of 187 species. Species richness "
            "did not decline with impervious surface cover; instead it was best explained by "
            "floral resource density and the proportion of allotment and community gardens "
            "within 500 m. Ground-nesting species were less frequent in the most urban sites, "
            "whereas cavity-nesting species increased. Our results suggest that gardens can act "
            "as refuges for wild bees and that urban planning should protect bare soil as "
            "nesting habitat alongside flowering plants."
        ),
    ),
    dict(
        field="astrophysics", subject="exoplanet atmospheres", data="transmission spectra",
        title="A water-rich atmosphere on the temperate sub-Neptune TOI-2217 b",
        text=(
            "We present the near-infrared transmission spectrum of TOI-2217 b, a sub-Neptune "
            "with a radius of 2.4 Earth radii orbiting an M dwarf at an equilibrium temperature "
            "of about 320 K. Observations of three transits with the NIRSpec PRISM instrument "
            "reveal absorption features of water vapour and methane at a combined significance "
            "of 6.1 sigma, while carbon dioxide is only tentatively detected. Retrievals favour "
            "a high mean molecular weight atmosphere with a water volume mixing ratio above 10 "
            "per cent, which is difficult to reconcile with a hydrogen-dominated envelope. We "
            "discuss the possibility that TOI-2217 b hosts a deep water layer and identify "
            "observations that could distinguish between this scenario and a mini-Neptune with "
            "a metal-enriched atmosphere."
        ),
    ),
    dict(
        field="materials science", subject="solid-state electrolytes",
        data="impedance measurements",
        title="Grain-boundary engineering raises the ionic conductivity of garnet electrolytes",
        text=(
            "Lithium garnets such as Li7La3Zr2O12 are promising solid electrolytes, but their "
            "total conductivity is often limited by resistive grain boundaries. Here we show that "
            "a thin amorphous lithium borate phase, introduced by a low-temperature sintering aid, "
            "lowers the grain-boundary resistance by two orders of magnitude without affecting "
            "the bulk lattice. Pellets sintered at 950 C reach a total conductivity of 0.82 mS/cm "
            "at room temperature and a relative density of 97 per cent. Symmetric lithium cells "
            "cycle for over 1,000 hours at 0.5 mA/cm2 without short circuit. Electron microscopy "
            "and impedance spectroscopy indicate that the borate phase wets the grain boundaries "
            "and suppresses lithium dendrite growth along them."
        ),
    ),
    dict(
        field="epidemiology", subject="influenza vaccination", data="registry data",
        title="Influenza vaccination and hospital admission for heart failure in older adults",
        text=(
            "Background: Influenza infection can precipitate acute cardiovascular events, and "
            "several observational studies have suggested that vaccination lowers the risk of "
            "myocardial infarction. Evidence on whether vaccination also reduces hospital "
            "admissions for heart failure is mixed, and confounding by health status is a "
            "persistent concern in cohort designs. Methods: We conducted a self-controlled case "
            "series using linked national registry data from Denmark covering the seasons 2010 to "
            "2019, including 64,211 adults aged 65 years or older who received at least one "
            "influenza vaccination and had at least one hospital admission for heart failure. "
            "Because each person serves as their own control, time-invariant confounders are "
            "removed by design. Incidence rate ratios were estimated for the 90 days after "
            "vaccination compared with unexposed periods, adjusted for season and age. Results: "
            "Admission rates were lower in the first 90 days after vaccination (incidence rate "
            "ratio 0.88, 95% CI 0.84 to 0.92). The largest reduction occurred during weeks of "
            "high influenza activity (0.79, 0.73 to 0.85), and no reduction was seen outside the "
            "influenza season, which argues against residual bias. Results were similar in men "
            "and women and in people with and without diabetes. Conclusions: Annual influenza "
            "vaccination was associated with fewer heart failure admissions in older adults, "
            "supporting current recommendations to vaccinate this group."
        ),
    ),
    dict(
        field="natural language processing", subject="retrieval-augmented generation",
        data="question answering benchmarks",
        title="Less is more: pruning retrieved passages improves small language models",
        text=(
            "Retrieval-augmented generation lets language models answer questions with evidence "
            "from an external corpus, but small models are easily distracted by irrelevant "
            "passages. We propose a lightweight passage pruner that scores each retrieved "
            "sentence with a 22M-parameter cross-encoder and keeps only those above a learned "
            "threshold. Across five open-domain question answering benchmarks, pruning reduces "
            "the prompt length by 63 per cent on average while improving exact match by 2.4 "
            "to 7.9 points for models between 135M and 1.7B parameters. Gains shrink for larger "
            "models, which are more robust to noise. We release the pruner and our evaluation code."
        ),
    ),
    dict(
        field="economics", subject="minimum wages", data="payroll records",
        title="Minimum wage increases and hours worked: evidence from payroll data",
        text=(
            "We study how employers adjust hours rather than headcount after minimum wage "
            "increases, using anonymised payroll records covering 1.9 million hourly workers in "
            "the United States between 2015 and 2022. Exploiting 137 state and city increases "
            "in a stacked difference-in-differences design, we find that affected workers' "
            "hourly wages rise by 8.3 per cent while weekly hours fall by 1.1 per cent, so that "
            "weekly earnings increase substantially. Employment effects are small and "
            "statistically insignificant. Reductions in hours are concentrated in firms with "
            "high scheduling flexibility, such as restaurants, and are absent in retail chains "
            "with fixed shift structures."
        ),
    ),
    dict(
        field="neuroscience", subject="sleep and memory", data="EEG recordings",
        title="Sleep spindles coupled to slow oscillations predict overnight memory retention",
        text=(
            "Memory consolidation during sleep is thought to depend on the precise timing of "
            "thalamocortical sleep spindles relative to cortical slow oscillations. We recorded "
            "high-density EEG in 41 healthy adults during a night of sleep after they learned "
            "120 word pairs. Retention the next morning correlated with the proportion of "
            "spindles occurring on the rising phase of slow oscillations (r = 0.52), but not with "
            "spindle density alone. The effect was strongest over centro-parietal electrodes and "
            "declined with age. Closed-loop auditory stimulation in a second experiment increased "
            "phase-coupled spindles and improved retention by 11 per cent, supporting a causal "
            "role for coupling."
        ),
    ),
    dict(
        field="oceanography", subject="marine heatwaves", data="satellite observations",
        title="Marine heatwaves deepen the summer mixed layer in the northeast Pacific",
        text=(
            "Marine heatwaves are usually described by their surface temperature anomalies, but "
            "their effect on the upper-ocean structure is less well known. Combining Argo float "
            "profiles with satellite sea surface temperatures for 2004 to 2023, we show that "
            "summer heatwaves in the northeast Pacific are associated with mixed layers 12 m "
            "shallower than the climatology at onset but anomalously deep in the following "
            "autumn. The deeper autumn mixing entrains nutrients late in the season and may "
            "explain the delayed phytoplankton blooms seen in ocean colour data after the 2014 "
            "to 2016 event."
        ),
    ),
    dict(
        field="organic chemistry", subject="photoredox catalysis", data="reaction yields",
        title="Visible-light decarboxylative amination of unactivated carboxylic acids",
        text=(
            "We report a photoredox method for converting aliphatic carboxylic acids directly "
            "into protected amines under blue-light irradiation at room temperature. An acridinium "
            "photocatalyst and a copper co-catalyst mediate decarboxylation and C-N bond formation "
            "with diazirines as the nitrogen source. The reaction tolerates esters, ketones, "
            "free alcohols and heteroarenes, and 52 examples were obtained in 41 to 92 per cent "
            "yield, including late-stage amination of drug molecules and amino acids. Mechanistic "
            "experiments support a radical pathway in which the copper catalyst captures the "
            "alkyl radical."
        ),
    ),
    dict(
        field="linguistics", subject="code-switching", data="conversational corpus",
        title=("Where bilinguals switch: prosodic boundaries and code-switching in "
               "Spanish-English speech"),
        text=(
            "Code-switching is often analysed as a syntactic phenomenon, but its relation to "
            "prosody has received less attention. Using a 40-hour corpus of spontaneous "
            "conversations among Spanish-English bilinguals in Miami, we annotated 3,412 switch "
            "points and the intonational phrase boundaries around them. Switches were 3.7 times "
            "more likely to occur at intonational phrase boundaries than expected by chance, and "
            "switches inside a phrase were preceded by longer pauses and lengthened syllables. "
            "We argue that speakers plan switches at prosodic units, and that models of "
            "code-switching should include prosodic as well as syntactic constraints."
        ),
    ),
    dict(
        field="civil engineering", subject="bridge monitoring", data="accelerometer data",
        title="Detecting scour under bridge piers from traffic-induced vibrations",
        text=(
            "Scour around bridge foundations is a leading cause of bridge failure, yet it is "
            "difficult to inspect during floods, when it matters most. We investigate whether "
            "scour can be detected from the vibrations caused by ordinary traffic. Low-cost "
            "accelerometers were installed on a three-span concrete bridge for 14 months, and "
            "natural frequencies were identified automatically from ambient data. After "
            "compensating for temperature, the first vertical mode of the pier adjacent to the "
            "river channel decreased by 3.2 per cent during two flood events and recovered "
            "partially afterwards, consistent with scour depths measured by sonar. A finite "
            "element model calibrated on the measurements reproduces the frequency shifts."
        ),
    ),
    dict(
        field="plant biology", subject="drought tolerance", data="greenhouse experiments",
        title=("A root-specific transcription factor links drought tolerance to lateral root "
               "growth in sorghum"),
        text=(
            "Drought is the main constraint on sorghum yield in semi-arid regions. Through a "
            "genome-wide association study of 412 accessions grown under water-limited conditions, "
            "we identified SbNAC42, a NAC-family transcription factor expressed in root tips. "
            "Lines overexpressing SbNAC42 produced 35 per cent more lateral roots and maintained "
            "higher leaf water potential during a 21-day drought in the greenhouse, while "
            "knockout lines were more sensitive. Field trials over two seasons showed a grain "
            "yield advantage of 14 per cent for overexpressing lines under drought, with no "
            "penalty under irrigation."
        ),
    ),
    dict(
        field="psychology", subject="growth mindset interventions", data="school records",
        title=("A preregistered replication of a brief growth-mindset intervention in "
               "secondary schools"),
        text=(
            "Brief interventions that teach students that intellectual ability can be developed "
            "have been reported to improve grades, particularly among lower-achieving students. We "
            "conducted a preregistered, cluster-randomised replication in 76 secondary schools in "
            "England with 9,840 students aged 13 to 14. The intervention consisted of two "
            "25-minute online sessions. Mindset beliefs shifted modestly in the expected "
            "direction, but we found no effect on end-of-year mathematics or English grades "
            "overall (standardised difference 0.01) or among lower-achieving students. These "
            "results suggest that effects reported in earlier studies may depend on context more "
            "than previously assumed."
        ),
    ),
    dict(
        field="mathematics", subject="graph colouring", data="proofs",
        title="Improved bounds on the odd chromatic number of planar graphs",
        text=(
            "An odd colouring of a graph is a proper colouring in which every non-isolated vertex "
            "has a colour that appears an odd number of times in its neighbourhood. Petrusevski "
            "and Skrekovski conjectured that every planar graph admits an odd 5-colouring and "
            "proved that 9 colours suffice. We improve this bound to 7 using the discharging "
            "method together with a new reducible configuration involving vertices of degree 5. "
            "We also show that planar graphs of girth at least 6 are odd 4-colourable, which is "
            "best possible."
        ),
    ),
    dict(
        field="archaeology", subject="ancient diet", data="isotope analyses",
        title=("Isotopic evidence for millet consumption in Bronze Age communities of the "
               "Carpathian Basin"),
        text=(
            "The spread of broomcorn millet from East Asia into Europe is dated to the second "
            "millennium BC, but when it became a staple food remains debated. We measured carbon "
            "and nitrogen stable isotopes in bone collagen from 183 individuals buried at nine "
            "Bronze Age cemeteries in present-day Hungary and Romania, together with 41 animal "
            "samples. Elevated carbon isotope values indicating substantial millet consumption "
            "appear abruptly around 1500 BC and are found in both men and women, children and "
            "adults. Radiocarbon dates on the same individuals tie this shift to the Middle "
            "Bronze Age, several centuries earlier than previously assumed for the region."
        ),
    ),
    dict(
        field="computer systems", subject="storage engines", data="benchmark workloads",
        title="Adaptive compaction for log-structured merge trees under shifting workloads",
        text=(
            "Log-structured merge trees trade write amplification against read and space "
            "amplification, and the best compaction policy depends on the workload. We present "
            "an adaptive compaction scheduler that observes the recent mix of reads, writes and "
            "range scans and switches between levelled and tiered compaction per level at run "
            "time. Implemented in RocksDB, the scheduler reduces write amplification by up to "
            "42 per cent on write-heavy phases while keeping point-read latency within 5 per "
            "cent of levelled compaction on read-heavy phases. Across six production traces, "
            "it matches or outperforms the best static configuration chosen in hindsight."
        ),
    ),
]
